"""CosFace (npc_head/arcface.py) alone, through its protocol on float64 cosines, against the
paper's formula s (c_y - m) (tests/helpers/margin_reference.py)."""
import pytest
import torch
import torch.nn.functional as F

import npc_head
from tests.helpers.head_protocol import (assert_matches_reference, assert_slope_is_the_derivative,
                                         protocol_loss, random_cosines)
from tests.helpers.margin_reference import row_logits


@pytest.mark.parametrize("params", [dict(s=64.0, m=0.4), dict(s=30.0, m=0.35),
                                    dict(s=64.0, m=0.0)])
def test_loss_and_gradient_match_the_paper(params):
    head = npc_head.CosFace(**params)
    cos, labels = random_cosines(seed=6)
    reference = lambda cy, c_neg: row_logits("cosface", params, cy, c_neg)[:2]  # noqa: E731
    prep, stats, _ = assert_matches_reference(head, reference, cos, labels)
    assert stats is None
    assert_slope_is_the_derivative(head, cos, prep)


def test_positive_logit_is_shifted_cosine_everywhere():
    """c_y - m on all of [-1, 1], slope 1 (no branch, no angle)."""
    cy = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64, requires_grad=True)
    positive = npc_head.CosFace(m=0.35).positive_logit(cy, {}, None)
    torch.testing.assert_close(positive.detach(), cy.detach() - 0.35, rtol=0, atol=0)
    positive.sum().backward()
    assert torch.equal(cy.grad, torch.ones_like(cy))


def test_loss_is_cross_entropy_of_the_shifted_logits():
    """The whole loss is softmax cross-entropy over s * (cos - m * onehot)."""
    cos, labels = random_cosines(seed=7)
    loss, _, _ = protocol_loss(npc_head.CosFace(s=30.0, m=0.35), cos, labels)
    onehot = F.one_hot(labels, cos.shape[1]).double()
    want = F.cross_entropy(30.0 * (cos - 0.35 * onehot), labels, reduction="none")
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=1e-14)
