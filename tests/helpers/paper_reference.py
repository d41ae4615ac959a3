"""Float64 references of MV-Softmax and CurricularFace, written from the papers / authors' code.

Deliberately naive (a Python loop over rows, angles through acos, masks built per row) and
independent of the package: the sharded heads are checked against these.
"""
from __future__ import annotations

import math

import torch

from tests.helpers.margin_reference import row_cross_entropy


def _theta(cy):
    return torch.acos(cy.clamp(-1 + 1e-15, 1 - 1e-15))


def row_logits(kind, p, cy, c_neg, t_value=0.0):
    """(positive logit, negative logits) of one row, unscaled; ``cy`` 0-d, ``c_neg`` the row's
    negative cosines (target column removed), both may carry gradients. ``t_value``:
    CurricularFace's t."""
    theta_y = float(torch.acos(cy.detach().clamp(-1.0, 1.0)))
    if kind == "mv":
        m, t = p["m"], p["t"]
        if p.get("arc", True):
            tau = math.cos(theta_y + m)
            pos = torch.cos(_theta(cy) + m) if float(cy.detach()) > 0 else cy
        else:
            tau = float(cy.detach()) - m
            pos = cy - m
        hard = c_neg.detach() > tau
        weight = 1.0 if p.get("fixed", False) else t
        neg = torch.where(hard, weight * c_neg + (t - 1.0), c_neg)
        return pos, neg
    if kind == "curricular":
        m = p["m"]
        tau = math.cos(theta_y + m)
        if float(cy.detach()) > math.cos(math.pi - m):
            pos = torch.cos(_theta(cy) + m)
        else:
            pos = cy - m * math.sin(math.pi - m)
        hard = c_neg.detach() > tau
        neg = torch.where(hard, c_neg * (t_value + c_neg), c_neg)
        return pos, neg
    raise ValueError(kind)


def target_cosines(embeddings, weight, labels):
    e = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    return torch.stack([(e[i] @ w[int(labels[i])]).clamp(-1.0, 1.0) for i in range(e.shape[0])])


def curricular_t_update(t_before, target_cos, momentum=0.01):
    """CurricularFace's t after one training forward whose target cosines are ``target_cos``:
    t <- momentum * mean(c_y) + (1 - momentum) * t (the authors' running average)."""
    return momentum * float(target_cos.detach().mean()) + (1.0 - momentum) * float(t_before)


def curricular_t_after(t_before, embeddings, weight, labels, momentum=0.01):
    """CurricularFace's t after one training forward on this batch (the authors' update)."""
    cy = target_cosines(embeddings.detach(), weight.detach(), labels)
    return curricular_t_update(t_before, cy, momentum)


def reference_loss(kind, params, embeddings, weight, labels, classes=None, t_value=0.0):
    """Mean loss of rows ``embeddings`` [B, D] against class rows ``weight`` [C, D].

    ``kind``: "mv" (params s, m, t, arc, fixed) or "curricular" (params s, m; ``t_value`` is
    the t the batch's negatives use, i.e. already updated for a training forward).
    ``classes``: the global class ids scored (Partial FC's sampled set); default all.
    """
    C = weight.shape[0]
    classes = list(range(C)) if classes is None else sorted(int(c) for c in classes)
    e = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    cos = (e @ w.t()).clamp(-1.0, 1.0)
    losses = []
    for i in range(e.shape[0]):
        y = int(labels[i])
        negatives = [k for k in classes if k != y]
        pos, neg = row_logits(kind, params, cos[i, y], cos[i, negatives], t_value)
        losses.append(row_cross_entropy(params["s"], pos, neg))
    return torch.stack(losses).mean()


def make_paper_head(kind, params):
    import npc_head

    if kind == "mv":
        return npc_head.MVSoftmax(**params)
    if kind == "curricular":
        return npc_head.CurricularFace(**params)
    raise ValueError(kind)
