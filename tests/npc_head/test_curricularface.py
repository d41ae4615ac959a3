"""CurricularFace (npc_head/curricularface.py) alone, through its protocol on float64 cosines,
against the paper / authors' per-row formula (tests/helpers/paper_reference.py), with its
running t; tests through PartialFC, gloo ranks and checkpoints are in test_mv_curricular.py."""
import math

import pytest
import torch

import npc_head

from tests.helpers.head_protocol import (assert_matches_reference, assert_slope_is_the_derivative,
                                         random_cosines, with_norms)
from tests.helpers.paper_reference import curricular_t_update, row_logits

PARAMS = dict(s=64.0, m=0.5)


@pytest.mark.parametrize("t_before", [0.0, 0.45, -0.2])
@pytest.mark.parametrize("training", [True, False])
def test_loss_and_gradient_match_the_paper(t_before, training):
    head = npc_head.CurricularFace(**PARAMS).double().train(training)
    head.t.fill_(t_before)
    cos, labels = random_cosines(seed=9)
    target = cos[torch.arange(cos.shape[0]), labels]
    # A training forward updates t before the batch's negatives use it (the authors' order).
    t_used = curricular_t_update(t_before, target) if training else t_before
    reference = lambda cy, c_neg: row_logits("curricular", PARAMS, cy, c_neg, t_used)  # noqa: E731
    prep, stats, _ = assert_matches_reference(head, reference, cos, labels)
    assert stats is None
    assert float(head.t) == pytest.approx(t_used, rel=1e-14, abs=1e-16)
    assert torch.equal(head.diagnostics(prep, stats)["t"], prep["t"])
    threshold = math.cos(math.pi - 0.5)
    assert (target <= threshold).any() and (target > threshold).any()  # both positive branches
    assert_slope_is_the_derivative(head.eval(), cos, prep)


def test_hard_negative_logit_and_slope():
    """A hard negative (c_k > cos(theta_y + m), strictly) has logit c_k (t + c_k) and slope
    t + 2 c_k; others keep c_k with slope 1."""
    head = npc_head.CurricularFace(**PARAMS).double().eval()
    head.t.fill_(0.3)
    prep = head.prepare(*with_norms(torch.tensor([0.6], dtype=torch.float64)))
    tau = float(prep["tau"][0])
    assert tau == pytest.approx(math.cos(math.acos(0.6) + 0.5), abs=1e-15)
    above = math.nextafter(tau, 2.0)
    cos = torch.tensor([[tau, above, 0.8, -0.5]], dtype=torch.float64)
    logits = head.negative_logits(cos, prep)[0].tolist()
    slope = head.negative_logit_slope(cos, prep)[0].tolist()
    assert logits[0] == tau and logits[3] == -0.5
    assert logits[1:3] == pytest.approx([above * (0.3 + above), 0.8 * 1.1], abs=1e-15)
    assert slope == pytest.approx([1.0, 0.3 + 2 * above, 1.9, 1.0], abs=1e-15)


def test_t_moves_only_in_training_mode():
    head = npc_head.CurricularFace(**PARAMS).double()
    target = torch.tensor([0.2, 0.6, -0.1], dtype=torch.float64)
    head.prepare(*with_norms(target))
    assert float(head.t) == pytest.approx(0.01 * 0.7 / 3, rel=1e-14)
    head.eval().prepare(*with_norms(target))
    assert float(head.t) == pytest.approx(0.01 * 0.7 / 3, rel=1e-14)
    head.train().prepare(*with_norms(target[:0]))  # an empty batch leaves t alone
    assert float(head.t) == pytest.approx(0.01 * 0.7 / 3, rel=1e-14)
