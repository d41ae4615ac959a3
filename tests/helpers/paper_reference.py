"""Float64 references of MV-Softmax, CurricularFace and AdaFace, written from the papers and the
authors' code.

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


# ---------------------------------------------------------------------------- AdaFace
ADAFACE_EPS = 1e-3


def adaface_clip_norm(norm) -> float:
    """The authors' clip of an embedding norm to [0.001, 100]."""
    return min(max(float(norm), 0.001), 100.0)


def adaface_buffers_after(mean, std, norms, t_alpha):
    """AdaFace's (batch_mean, batch_std) after one training forward on a batch with these
    embedding norms: each moves by t_alpha towards the batch's mean / unbiased std of the
    clipped norms (plain Python floats, one value at a time)."""
    safe = [adaface_clip_norm(n) for n in norms]
    mu = sum(safe) / len(safe)
    sd = math.sqrt(sum((x - mu) ** 2 for x in safe) / (len(safe) - 1))
    return t_alpha * mu + (1 - t_alpha) * float(mean), t_alpha * sd + (1 - t_alpha) * float(std)


def adaface_scaler(norm, mean, std, h) -> float:
    """z_i = clip((n_i - mean) / (std + 1e-3) * h, -1, 1) of one row, n_i clipped."""
    return min(max((adaface_clip_norm(norm) - mean) / (std + ADAFACE_EPS) * h, -1.0), 1.0)


def adaface_row_logits(cy, c_neg, z, m):
    """(positive, negatives) of one AdaFace row with margin scaler ``z`` (a float): the angle of
    c_y (clamped to 1e-3 inside [-1, 1]) minus m z, clipped into [1e-3, pi - 1e-3], back to a
    cosine, less m (1 + z); negatives unchanged."""
    theta = torch.acos(cy.clamp(-1 + ADAFACE_EPS, 1 - ADAFACE_EPS))
    pos = torch.cos((theta - m * z).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)) - (m + m * z)
    return pos, c_neg


def adaface_reference_loss(params, embeddings, weight, labels, mean, std, classes=None):
    """Mean AdaFace loss of rows ``embeddings`` [B, D] (raw: their norms set the margins)
    against class rows ``weight`` [C, D] with the buffers ``mean`` / ``std`` the batch uses
    (already updated for a training forward); ``classes`` the scored class ids (default all).
    Returns (loss, per-row z)."""
    C = weight.shape[0]
    classes = list(range(C)) if classes is None else sorted(int(c) for c in classes)
    norms = [float(torch.sqrt((embeddings[i].detach() ** 2).sum())) for i in range(len(labels))]
    e = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    cos = (e @ w.t()).clamp(-1.0, 1.0)
    losses, scalers = [], []
    for i in range(e.shape[0]):
        y = int(labels[i])
        z = adaface_scaler(norms[i], mean, std, params["h"])
        pos, neg = adaface_row_logits(cos[i, y], cos[i, [k for k in classes if k != y]], z,
                                      params["m"])
        losses.append(row_cross_entropy(params["s"], pos, neg))
        scalers.append(z)
    return torch.stack(losses).mean(), torch.tensor(scalers, dtype=torch.float64)
