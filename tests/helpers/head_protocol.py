"""Drive a margin head through its protocol (npc_head/base.py) on a cosine matrix, without
PartialFC, and compare it with a per-row float64 reference written from the paper.

The head sees the protocol's calls in the classifier's order (prepare, negative_sums,
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


def with_norms(target_cos: torch.Tensor):
    """``(target_cos, norms)`` for ``prepare`` where the norms do not matter (all 1)."""
    return target_cos, torch.ones_like(target_cos)


def protocol_loss(head: MarginHead, cos: torch.Tensor, labels: torch.Tensor, norms=None):
    """Per-row loss [rows] of ``cos`` [rows, classes] with target columns ``labels``, composed
    from the head's calls as the (single-process) classifier composes them (docs/ALGORITHM.md,
    section 4); ``norms`` [rows] the embedding norms (default all 1). Also returns ``prep`` and
    the statistics (target column removed)."""
    rows = torch.arange(cos.shape[0])
    target = cos[rows, labels]
    norms = torch.ones_like(target) if norms is None else norms
    prep = head.prepare(target.detach(), norms)
    stats = None
    if head.num_stats:
        with torch.no_grad():
            every = torch.stack(head.negative_sums(cos.detach(), prep), dim=1).double()
            own = torch.stack(head.negative_sums(target.detach()[:, None], prep), dim=1).double()
        stats = every - own
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


def assert_slope_is_the_derivative(head: MarginHead, cos: torch.Tensor, prep) -> None:
    """``negative_logit_slope`` (closed form or the protocol's default) is the autograd
    derivative of ``negative_logits`` (None: identically 1), and neither alters ``cos``."""
    before = cos.clone()
    slope = head.negative_logit_slope(cos, prep)
    c = cos.clone().requires_grad_(True)
    logits = head.negative_logits(c, prep)
    auto = torch.autograd.grad(logits.sum(), c)[0] if logits.requires_grad else torch.ones_like(cos)
    torch.testing.assert_close(torch.ones_like(cos) if slope is None else slope, auto,
                               rtol=1e-14, atol=1e-14)
    assert torch.equal(cos, before)
