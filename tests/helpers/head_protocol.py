"""Drive a margin head through its protocol (npc_head/base.py) on a cosine matrix, without
PartialFC, and compare it with a per-row float64 reference written from the paper.

The head sees the four calls in the classifier's order (prepare, negative_stats,
negative_logits, positive_logit); the reference sees only one row's target cosine and its
negative cosines (target column removed), so the two share nothing but the inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from npc_head.base import MarginHead

from tests.helpers.margin_reference import row_cross_entropy

# Spread of the target cosines: every regime of every head (near +1: few or no hard negatives;
# around 0: NPCFace's and MV-Arc's easy-margin switch; below cos(pi - m): ArcFace's fallback;
# near -1: almost every negative hard).
TARGETS = (0.999, 0.98, 0.9, 0.7, 0.4, 0.1, 1e-3, -1e-3, -0.2, -0.5, -0.8, -0.9, -0.95, -0.999)


def random_cosines(rows: int = 28, classes: int = 40, seed: int = 0):
    """(cos [rows, classes] float64, labels [rows]): negatives uniform in (-1, 1), in (-0.5, 0.5)
    on every seventh row (so rows with a target near 1 and no hard negative occur); the target
    cosines cycle through ``TARGETS``."""
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, classes, generator=g, dtype=torch.float64) * 2 - 1
    cos[::7] *= 0.5
    labels = torch.randint(0, classes, (rows,), generator=g)
    targets = torch.tensor(TARGETS, dtype=torch.float64).repeat(math.ceil(rows / len(TARGETS)))
    cos[torch.arange(rows), labels] = targets[:rows]
    return cos, labels


def protocol_loss(head: MarginHead, cos: torch.Tensor, labels: torch.Tensor):
    """Per-row loss [rows] of ``cos`` [rows, classes] with target columns ``labels``, composed
    from the head's four calls as the (single-process) classifier composes them; also returns
    ``prep`` and the statistics (target column removed)."""
    rows = torch.arange(cos.shape[0])
    target = cos[rows, labels]
    prep = head.prepare(target.detach())
    stats = head.negative_stats(cos.detach(), prep)
    if stats is not None:
        stats = stats - head.negative_stats(target.detach()[:, None], prep)
    positive = head.positive_logit(target, prep, stats)
    logits = head.negative_logits(cos, prep).index_put((rows, labels), positive)
    loss = F.cross_entropy(head.scale * logits, labels, reduction="none")
    return loss, prep, stats


def reference_rows(row_logits, s: float, cos: torch.Tensor, labels: torch.Tensor):
    """Per-row loss [rows] from ``row_logits(c_y, c_neg) -> (positive, negatives)``, one row at
    a time; the ``extra`` items ``row_logits`` returns after those two are collected per row."""
    losses, extras = [], []
    for i in range(cos.shape[0]):
        y = int(labels[i])
        negatives = [k for k in range(cos.shape[1]) if k != y]
        pos, neg, *extra = row_logits(cos[i, y], cos[i, negatives])
        losses.append(row_cross_entropy(s, pos, neg))
        extras.append(extra)
    return torch.stack(losses), extras


def assert_matches_reference(head, row_logits, cos, labels, rtol=1e-12):
    """Loss and d loss / d cos of the head's protocol equal the reference's (float64).

    Returns (prep, stats, reference extras) for further checks."""
    c_head = cos.clone().requires_grad_(True)
    loss, prep, stats = protocol_loss(head, c_head, labels)
    loss.sum().backward()
    c_ref = cos.clone().requires_grad_(True)
    ref, extras = reference_rows(row_logits, head.scale, c_ref, labels)
    ref.sum().backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(c_head.grad, c_ref.grad, rtol=rtol, atol=rtol)
    return prep, stats, extras


def assert_tile_methods_agree(head: MarginHead, cos: torch.Tensor, prep) -> None:
    """The chunked classifier's tile-level calls equal the plain calls they stand for:
    ``negative_logit_slope`` (closed form or default) is the autograd derivative of
    ``negative_logits``; ``negative_stats_and_logits`` is (negative_stats, s * negative_logits);
    ``negative_softmax_slope`` is exp(s * logit - shift) * slope. None of them alter ``cos``
    when handed a copy."""
    slope = head.negative_logit_slope(cos, prep)
    c = cos.clone().requires_grad_(True)
    logits = head.negative_logits(c, prep)
    if logits.requires_grad:
        (auto,) = torch.autograd.grad(logits.sum(), c)
    else:
        auto = torch.ones_like(cos)
    torch.testing.assert_close(torch.ones_like(cos) if slope is None else slope, auto,
                               rtol=1e-14, atol=1e-14)

    plain = head.negative_logits(cos, prep) * head.scale
    stats, tile_logits = head.negative_stats_and_logits(cos.clone(), prep)
    want_stats = head.negative_stats(cos, prep)
    if want_stats is None:
        assert stats is None
    else:
        torch.testing.assert_close(stats, want_stats, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(tile_logits, plain, rtol=1e-14, atol=1e-12)

    shift = plain.amax(dim=1)
    want = torch.exp(plain - shift[:, None]) * auto
    got = head.negative_softmax_slope(cos.clone(), prep, shift)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
