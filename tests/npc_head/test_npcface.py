"""NPCFace (npc_head/npcface.py) alone, through its protocol on float64 cosines, against the
paper's per-row formula (tests/helpers/margin_reference.py) and its special cases
(docs/ALGORITHM.md, "NPCFace")."""
import math

import pytest
import torch

import npc_head
from tests.helpers.head_protocol import (assert_matches_reference, assert_slope_is_the_derivative,
                                         protocol_loss, random_cosines, with_norms)
from tests.helpers.margin_reference import row_logits

DEFAULTS = dict(s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2)
PARAMS = [
    DEFAULTS,
    dict(s=32.0, m0=0.5, m1=0.3, t=1.2, alpha=0.1, hard_margin=0.3),
    dict(s=64.0, m0=0.4, m1=0.0, t=1.0, alpha=0.0),  # ArcFace, easy-margin form
    dict(s=16.0, m0=0.0, m1=0.5, t=1.3, alpha=0.3),
]


def _reference(params):
    return lambda cy, c_neg: row_logits("npcface", params, cy, c_neg)


def _row(target, negatives):
    """One row whose target (column 0) and negative cosines are given, float64."""
    cos = torch.tensor([[target, *negatives]], dtype=torch.float64)
    return cos, torch.zeros(1, dtype=torch.int64)


@pytest.mark.parametrize("params", PARAMS)
def test_loss_gradient_margin_and_hard_count_match_the_paper(params):
    head = npc_head.NPCFace(**params)
    cos, labels = random_cosines(seed=1)
    prep, stats, extras = assert_matches_reference(head, _reference(params), cos, labels)
    margins = torch.tensor([m for m, _ in extras], dtype=torch.float64)
    counts = torch.tensor([n for _, n in extras], dtype=torch.float64)
    diagnostics = head.diagnostics(prep, stats)
    torch.testing.assert_close(diagnostics["margin"], margins, rtol=1e-13, atol=1e-13)
    assert torch.equal(diagnostics["hard_count"], counts)
    # The case is only a test if rows without, with some and with many hard negatives occur.
    assert (counts == 0).any() and (counts >= 30).any() and ((counts > 0) & (counts < 30)).any()
    assert_slope_is_the_derivative(head, cos, prep)


def test_margin_and_threshold_pass_no_gradient():
    """m_i and tau are constants of the backward: d loss / d c_k is s * softmax_k * (t or 1)."""
    head = npc_head.NPCFace(**DEFAULTS)
    cos, labels = random_cosines(rows=6, seed=2)
    c = cos.clone().requires_grad_(True)
    loss, prep, _ = protocol_loss(head, c, labels)
    loss.sum().backward()
    logits = head.negative_logits(cos, prep)
    rows = torch.arange(6)
    logits[rows, labels] = head.positive_logit(cos[rows, labels], prep,
                                               protocol_loss(head, cos, labels)[2])
    probs = torch.softmax(head.scale * logits, dim=1)
    hard = cos > prep["tau"][:, None]
    want = head.scale * probs * (1.0 + (head.t - 1.0) * hard.double())
    off_target = torch.ones_like(cos, dtype=torch.bool)
    off_target[rows, labels] = False
    torch.testing.assert_close(c.grad[off_target], want[off_target], rtol=1e-12, atol=1e-15)


def test_hard_threshold_is_strict():
    """I_k = [c_k > tau]: a negative exactly at tau is easy, the next float above is hard."""
    head = npc_head.NPCFace(**DEFAULTS)
    target = torch.tensor([0.6], dtype=torch.float64)
    tau = float(head.prepare(*with_norms(target))["tau"][0])
    assert tau == pytest.approx(math.cos(math.acos(0.6) + 0.4), abs=1e-15)
    above = math.nextafter(tau, 2.0)
    cos, labels = _row(0.6, [tau, above, -0.3])
    _, prep, stats = protocol_loss(head, cos, labels)
    assert stats[0, 0].item() == pytest.approx(above, abs=1e-15) and stats[0, 1].item() == 1.0
    logits = head.negative_logits(cos, prep)[0]
    assert logits[1].item() == tau and logits[3].item() == -0.3
    assert logits[2].item() == pytest.approx(1.1 * above + 0.2, abs=1e-15)
    assert head.margin(stats)[0].item() == pytest.approx(0.4 + 0.2 * above, abs=1e-15)


def test_no_hard_negative_leaves_margin_m0_and_negatives_plain():
    head = npc_head.NPCFace(**DEFAULTS)
    cos, labels = _row(0.95, [0.5, -0.2, 0.0, 0.7])  # tau = cos(acos(0.95) + 0.4) = 0.753
    loss, prep, stats = protocol_loss(head, cos, labels)
    assert stats[0].tolist() == [0.0, 0.0]
    assert head.margin(stats)[0].item() == 0.4  # the count is floored at 1: m0 exactly
    assert torch.equal(head.negative_logits(cos, prep)[:, 1:], cos[:, 1:])  # column 0: target
    theta = math.acos(0.95)
    logits = 64.0 * torch.tensor([math.cos(theta + 0.4), 0.5, -0.2, 0.0, 0.7], dtype=torch.float64)
    torch.testing.assert_close(loss[0], -torch.log_softmax(logits, 0)[0], rtol=1e-14, atol=0)


def test_target_column_is_never_hard():
    """The target's own cosine (above its threshold) is removed from the statistics."""
    head = npc_head.NPCFace(**DEFAULTS)
    cos, labels = _row(0.7, [0.9, -0.5])
    _, _, stats = protocol_loss(head, cos, labels)
    assert stats[0, 0].item() == pytest.approx(0.9, abs=1e-15) and stats[0, 1].item() == 1.0


def test_positive_logit_is_easy_margin():
    """cos(theta_y + m_i) where c_y > 0, else c_y itself (slope 1): theta + m never passes pi
    through the margin branch while m_i < pi / 2. At c_y = 1 the guarded sine is sqrt(eps)
    (1.5e-8 in float64), not 0."""
    head = npc_head.NPCFace(**DEFAULTS)
    cy = torch.tensor([0.0, 5e-324, -0.3, -1.0, 1.0, 0.5], dtype=torch.float64,
                      requires_grad=True)
    stats = torch.tensor([[1.6, 2.0]] * 6, dtype=torch.float64)  # mean hard cosine 0.8
    prep = head.prepare(*with_norms(cy.detach()))
    positive = head.positive_logit(cy, prep, stats)
    m = 0.4 + 0.2 * 0.8
    want = [0.0, math.cos(math.pi / 2 + m), -0.3, -1.0, math.cos(m), math.cos(math.acos(0.5) + m)]
    want[4] -= math.sqrt(torch.finfo(torch.float64).eps) * math.sin(m)
    torch.testing.assert_close(positive.detach(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)
    positive.sum().backward()
    assert cy.grad[[0, 2, 3]].tolist() == [1.0, 1.0, 1.0]
    assert torch.isfinite(cy.grad).all()  # c_y = 1: the guarded sine has a finite slope


def test_threshold_past_pi_keeps_cosine():
    """tau = cos(theta_y + hard_margin) also when theta_y + hard_margin > pi (c_y near -1):
    cos keeps its value there (tau = -cos(hm) at c_y = -1), it is not clamped to -1."""
    head = npc_head.NPCFace(**DEFAULTS)
    tau = head.prepare(*with_norms(torch.tensor([-1.0, -0.95], dtype=torch.float64)))["tau"]
    want = [math.cos(math.pi + 0.4), math.cos(math.acos(-0.95) + 0.4)]
    torch.testing.assert_close(tau, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-8)
    cos, labels = _row(-1.0, [-0.95, -0.9, 0.0])  # -cos(0.4) = -0.921: only -0.95 is easy
    _, _, stats = protocol_loss(head, cos, labels)
    assert stats[0, 1].item() == 2.0


def test_mv_arc_softmax_is_the_special_case_without_collaboration():
    """m1 = 0, alpha = t - 1, hard_margin = m0: MV-Arc-Softmax (adaptive weight), same calls."""
    cos, labels = random_cosines(seed=3)
    npc, _, _ = protocol_loss(npc_head.NPCFace(s=32.0, m0=0.35, m1=0.0, t=1.2, alpha=0.2),
                              cos, labels)
    mv, _, _ = protocol_loss(npc_head.MVSoftmax(s=32.0, m=0.35, t=1.2), cos, labels)
    torch.testing.assert_close(npc, mv, rtol=1e-14, atol=1e-14)


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="m0 must be"):
        npc_head.NPCFace(m0=-0.1)
    with pytest.raises(ValueError, match="m1 must be"):
        npc_head.NPCFace(m1=-0.1)
    with pytest.raises(ValueError, match="t must be"):
        npc_head.NPCFace(t=0.9)
    with pytest.raises(ValueError, match="scale s must be"):
        npc_head.NPCFace(s=0.0)
