"""Single-process float64 references of the margin losses, written from the papers' formulas.

Deliberately naive (a Python loop over rows, angles through acos) and independent of the
package's code: this is what the sharded implementation is checked against.
"""
from __future__ import annotations

import math

import torch


def _positive(kind, p, cy):
    theta = torch.acos(cy.clamp(-1 + 1e-15, 1 - 1e-15))
    if kind == "cosface":
        return cy - p["m"]
    if kind == "arcface":
        if float(cy.detach()) > math.cos(math.pi - p["m"]):
            return torch.cos(theta + p["m"])
        return cy - p["m"] * math.sin(math.pi - p["m"])
    raise ValueError(kind)


def row_logits(kind, params, cy, c_neg):
    """Unscaled (positive logit, negative logits, margin, hard count) of one row.

    ``cy`` is the row's target cosine (0-d), ``c_neg`` its negative cosines (target column
    removed); both may carry gradients. ``margin`` and ``hard count`` are NPCFace's m_i and
    sum_k I_k (None for the other heads).
    """
    if kind != "npcface":
        return _positive(kind, params, cy), c_neg, None, None
    hm = params.get("hard_margin")
    hm = params["m0"] if hm is None else hm
    theta = math.acos(max(-1.0, min(1.0, float(cy.detach()))))
    tau = math.cos(theta + hm)
    hard = c_neg.detach() > tau
    n_hard = int(hard.sum())
    mean_hard = float(c_neg.detach()[hard].sum()) / max(1, n_hard)
    m = params["m0"] + params["m1"] * mean_hard
    if float(cy.detach()) > 0:
        pos = torch.cos(torch.acos(cy.clamp(-1 + 1e-15, 1 - 1e-15)) + m)
    else:
        pos = cy
    neg = torch.where(hard, params["t"] * c_neg + params["alpha"], c_neg)
    return pos, neg, m, n_hard


def row_cross_entropy(s, pos, neg):
    """-log softmax(s * [pos, neg])[0]: one row's loss from its unscaled logits."""
    return -torch.log_softmax(s * torch.cat([pos.reshape(1), neg]), dim=0)[0]


def reference_loss(kind, params, embeddings, weight, labels, classes=None):
    """Mean loss of rows ``embeddings`` [B, D] against class rows ``weight`` [C, D].

    ``classes``: the global class ids scored (Partial FC's sampled set); default all.
    Returns (loss, per-row dict of margin / hard_count for NPCFace).
    """
    C = weight.shape[0]
    classes = list(range(C)) if classes is None else sorted(int(c) for c in classes)
    e = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    cos = (e @ w.t()).clamp(-1.0, 1.0)
    losses, margins, hard_counts = [], [], []
    for i in range(e.shape[0]):
        y = int(labels[i])
        negatives = [k for k in classes if k != y]
        pos, neg, m, n_hard = row_logits(kind, params, cos[i, y], cos[i, negatives])
        losses.append(row_cross_entropy(params["s"], pos, neg))
        margins.append(m)
        hard_counts.append(n_hard)
    loss = torch.stack(losses).mean()
    stats = {}
    if kind == "npcface":
        stats = {
            "margin": torch.tensor(margins, dtype=torch.float64),
            "hard_count": torch.tensor(hard_counts, dtype=torch.float64),
        }
    return loss, stats


def make_head(kind, params):
    import npc_head

    if kind == "npcface":
        return npc_head.NPCFace(**params)
    if kind == "arcface":
        return npc_head.ArcFace(**params)
    if kind == "cosface":
        return npc_head.CosFace(**params)
    raise ValueError(kind)


def make_problem(num_classes, dim, batch, seed, spread=1.0):
    """Random weights and embeddings with every regime present.

    Rows come in three kinds: near their class centre (c_y close to 1: no hard negatives),
    opposite it (c_y close to -1: negative target cosine, every negative hard), and random.
    """
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * spread
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    w_unit = weight / weight.norm(dim=1, keepdim=True)
    for i in range(batch):
        kind = i % 3
        noise = 0.05 * torch.randn(dim, generator=g, dtype=torch.float64)
        if kind == 0:
            emb[i] = (w_unit[labels[i]] + noise) * 3.0
        elif kind == 1:
            emb[i] = (-w_unit[labels[i]] + noise) * 0.5
    return weight, emb, labels
