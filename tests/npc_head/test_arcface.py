"""ArcFace (npc_head/arcface.py) alone, through its protocol on float64 cosines, against the
paper's formula with insightface's fallback past theta_y + m = pi
(tests/helpers/margin_reference.py)."""
import math

import pytest
import torch

import npc_head

from tests.helpers.head_protocol import (assert_matches_reference, assert_slope_is_the_derivative,
                                         random_cosines)
from tests.helpers.margin_reference import row_logits


@pytest.mark.parametrize("params", [dict(s=64.0, m=0.5), dict(s=32.0, m=0.3),
                                    dict(s=64.0, m=1.2), dict(s=10.0, m=0.0)])
def test_loss_and_gradient_match_the_paper(params):
    head = npc_head.ArcFace(**params)
    cos, labels = random_cosines(seed=4)
    reference = lambda cy, c_neg: row_logits("arcface", params, cy, c_neg)[:2]  # noqa: E731
    prep, stats, _ = assert_matches_reference(head, reference, cos, labels)
    assert stats is None and head.diagnostics(prep, stats) == {}
    target = cos[torch.arange(cos.shape[0]), labels]
    if params["m"] > 0:  # both branches of the positive logit occur
        threshold = math.cos(math.pi - params["m"])
        assert (target > threshold).any() and (target <= threshold).any()
    assert_slope_is_the_derivative(head, cos, prep)
    assert head.negative_logit_slope(cos, prep) is None  # negatives are the cosines themselves


def test_fallback_branch_edge():
    """cos(theta + m) only where c_y > cos(pi - m) (strict); at and below it c_y - m sin(pi - m),
    the linear continuation insightface uses once theta_y + m would pass pi."""
    m = 0.5
    head = npc_head.ArcFace(s=64.0, m=m)
    edge = math.cos(math.pi - m)
    cy = torch.tensor([edge, math.nextafter(edge, 1.0), -1.0, 0.2], dtype=torch.float64,
                      requires_grad=True)
    positive = head.positive_logit(cy, {}, None)
    fallback = m * math.sin(math.pi - m)
    want = [edge - fallback, math.cos(math.acos(math.nextafter(edge, 1.0)) + m), -1.0 - fallback,
            math.cos(math.acos(0.2) + m)]
    torch.testing.assert_close(positive.detach(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    positive.sum().backward()
    assert cy.grad[[0, 2]].tolist() == [1.0, 1.0]
    slope = math.sin(math.acos(0.2) + m) / math.sin(math.acos(0.2))  # d cos(theta + m) / d cos
    assert cy.grad[3].item() == pytest.approx(slope, rel=1e-12)


def test_positive_logit_never_increases_with_the_angle():
    """The reason for the fallback: the target logit is non-decreasing in c_y on all of [-1, 1]
    (cos(theta + m) alone turns back up once theta + m > pi)."""
    for m in (0.3, 0.5, 1.0, 2.0):
        cy = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64)
        positive = npc_head.ArcFace(m=m).positive_logit(cy, {}, None)
        assert (positive.diff() >= 0).all(), m
        assert (positive <= cy).all()


def test_zero_margin_is_the_normalised_softmax():
    cos, labels = random_cosines(seed=5)
    head = npc_head.ArcFace(s=16.0, m=0.0)
    rows = torch.arange(cos.shape[0])
    positive = head.positive_logit(cos[rows, labels], {}, None)
    torch.testing.assert_close(positive, cos[rows, labels], rtol=0, atol=2e-8)


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="m must be"):
        npc_head.ArcFace(m=math.pi)
    with pytest.raises(ValueError, match="m must be"):
        npc_head.ArcFace(m=-0.1)
    with pytest.raises(ValueError, match="scale s must be"):
        npc_head.ArcFace(s=-1.0)
