"""MV-Softmax (npc_head/mvsoftmax.py) alone, through its protocol on float64 cosines, against the
paper / authors' per-row formula (tests/helpers/paper_reference.py); tests through PartialFC
and gloo ranks are in test_mv_curricular.py."""
import math

import pytest
import torch

import npc_head
from tests.helpers.head_protocol import (assert_matches_reference, assert_slope_is_the_derivative,
                                         protocol_loss, random_cosines, with_norms)
from tests.helpers.paper_reference import row_logits

CASES = [
    dict(s=32.0, m=0.35, t=1.2, arc=True, fixed=False),
    dict(s=32.0, m=0.5, t=1.3, arc=True, fixed=True),
    dict(s=30.0, m=0.35, t=1.2, arc=False, fixed=False),
    dict(s=30.0, m=0.3, t=1.25, arc=False, fixed=True),
    dict(s=32.0, m=0.35, t=1.0, arc=True, fixed=False),  # t = 1: plain (easy-margin) ArcFace
]


@pytest.mark.parametrize("params", CASES)
def test_loss_and_gradient_match_the_paper(params):
    head = npc_head.MVSoftmax(**params)
    cos, labels = random_cosines(seed=8)
    reference = lambda cy, c_neg: row_logits("mv", params, cy, c_neg)  # noqa: E731
    prep, stats, _ = assert_matches_reference(head, reference, cos, labels)
    assert stats is None
    hard = (cos > prep["tau"][:, None]).sum(dim=1)
    assert (hard <= 1).any() and (hard >= 30).any()  # easy and mis-classified rows both occur
    assert_slope_is_the_derivative(head, cos, prep)


@pytest.mark.parametrize("arc", [True, False])
def test_mis_classified_threshold_is_strict(arc):
    """A negative exactly at the threshold (cos(theta_y + m), or c_y - m) keeps c_k; the next
    float above becomes t c_k + t - 1."""
    head = npc_head.MVSoftmax(s=32.0, m=0.35, t=1.2, arc=arc)
    tau = float(head.prepare(*with_norms(torch.tensor([0.6], dtype=torch.float64)))["tau"][0])
    want_tau = math.cos(math.acos(0.6) + 0.35) if arc else 0.6 - 0.35
    assert tau == pytest.approx(want_tau, abs=1e-15)
    above = math.nextafter(tau, 2.0)
    cos = torch.tensor([[0.6, tau, above]], dtype=torch.float64)
    logits = head.negative_logits(cos, head.prepare(*with_norms(cos[:, 0])))[0]
    assert logits[1].item() == tau
    assert logits[2].item() == pytest.approx(1.2 * above + 0.2, abs=1e-15)


def test_positive_logit_branches():
    """arc: cos(theta_y + m) where c_y > 0, else c_y (easy margin); not arc: c_y - m."""
    cy = torch.tensor([0.0, -0.4, 0.5], dtype=torch.float64)
    arc = npc_head.MVSoftmax(m=0.35).positive_logit(cy, {}, None)
    want = [0.0, -0.4, math.cos(math.acos(0.5) + 0.35)]
    torch.testing.assert_close(arc, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    am = npc_head.MVSoftmax(m=0.35, arc=False).positive_logit(cy, {}, None)
    torch.testing.assert_close(am, cy - 0.35, rtol=0, atol=0)


def test_without_mis_classified_negatives_it_is_the_margin_softmax():
    """Rows whose negatives all lie below the threshold: the loss of ArcFace's easy-margin form
    (arc) or of CosFace (not arc), whatever t is."""
    cos = torch.tensor([[0.95, 0.1, -0.3, 0.5], [0.9, 0.0, 0.2, -0.9]], dtype=torch.float64)
    labels = torch.zeros(2, dtype=torch.int64)
    for arc, plain in ((True, npc_head.NPCFace(s=32.0, m0=0.35, m1=0.0, t=1.0, alpha=0.0)),
                       (False, npc_head.CosFace(s=32.0, m=0.35))):
        mv, _, _ = protocol_loss(npc_head.MVSoftmax(s=32.0, m=0.35, t=1.5, arc=arc), cos, labels)
        want, _, _ = protocol_loss(plain, cos, labels)
        torch.testing.assert_close(mv, want, rtol=1e-14, atol=0)
