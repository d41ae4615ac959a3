"""The distributed softmax cross-entropy against torch's own, sharded over columns."""
import pytest
import torch
import torch.nn.functional as F

from partial_fc import distributed_cross_entropy

from tests.helpers.dist_harness import run_workers

SPLITS = {2: [0, 9, 23], 3: [0, 10, 10, 23]}  # column boundaries; 3 ranks: one owns nothing


def _problem():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 23, generator=g, dtype=torch.float64) * 40  # large: needs the max
    labels = torch.randint(0, 23, (9,), generator=g)
    return logits, labels


def test_single_process_equals_torch_cross_entropy():
    logits, labels = _problem()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    loss = distributed_cross_entropy(a, labels)
    ref = F.cross_entropy(b, labels, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    weights = torch.rand(9, dtype=torch.float64)
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_shape_errors():
    with pytest.raises(ValueError):
        distributed_cross_entropy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        distributed_cross_entropy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def _worker(rank, world_size):
    logits, labels = _problem()
    lo, hi = SPLITS[world_size][rank], SPLITS[world_size][rank + 1]
    local = logits[:, lo:hi].clone().requires_grad_(True)
    owned = (labels >= lo) & (labels < hi)
    target = torch.where(owned, labels - lo, -1)
    loss = distributed_cross_entropy(local, target, torch.distributed.group.WORLD)
    loss.mean().backward()
    return loss.detach(), local.grad, lo, hi


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_equals_torch_cross_entropy(world_size):
    logits, labels = _problem()
    ref_in = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in, labels, reduction="none")
    ref.mean().backward()
    for loss, grad, lo, hi in run_workers(_worker, world_size):
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, ref_in.grad[:, lo:hi], rtol=1e-12, atol=1e-15)
