"""The classifier's collectives (partial_fc/classifier/collectives.py) over gloo: the
single-tensor all-gather / reduce-scatter and the list forms a backend without them falls back
to, for equal and unequal row counts, against the concatenation every rank can form itself."""
import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from partial_fc.classifier import collectives

from tests.helpers.dist_harness import run_workers

SIZES = {"equal": [4, 4, 4], "unequal": [5, 0, 3]}


def _rows(rank, n, dtype=torch.float64):
    return (torch.arange(n * 3, dtype=torch.float64).view(n, 3) + 100 * rank).to(dtype)


def _weights(computing_rank, total):
    g = torch.Generator().manual_seed(computing_rank)
    return torch.randn(total, 3, generator=g, dtype=torch.float64)


def _collectives_worker(rank, world_size, form, layout):
    collectives.TENSOR_COLLECTIVES["gloo"] = form == "tensor"
    group, sizes = dist.group.WORLD, SIZES[layout]
    x = _rows(rank, sizes[rank]).requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gathered = collectives.all_gather_rows(x, sizes, group)
        (gathered * _weights(rank, sum(sizes))).sum().backward()
    bf16 = collectives.all_gather_rows(_rows(rank, sizes[rank], torch.bfloat16), sizes, group)
    header = collectives.gather_header(torch.tensor([sizes[rank], rank * 7]), group)
    unknown = collectives.all_gather_rows(x.detach(), group=group)  # sizes gathered here
    return dict(gathered=gathered.detach(), grad=x.grad, bf16=bf16, header=header,
                unknown=unknown,
                ops={e.key for e in prof.key_averages() if e.key.startswith("c10d::")})


@pytest.mark.parametrize("layout", sorted(SIZES))
@pytest.mark.parametrize("form", ["tensor", "list"])
def test_rows_gather_and_their_gradients_reduce_scatter_in_either_form(form, layout):
    sizes = SIZES[layout]
    results = run_workers(_collectives_worker, 3, form, layout)
    want = torch.cat([_rows(r, n) for r, n in enumerate(sizes)])
    total = sum(sizes)
    summed = sum(_weights(q, total) for q in range(3))  # every rank's loss reaches every row
    for rank, res in enumerate(results):
        assert res["ops"] == ({"c10d::_allgather_base_", "c10d::_reduce_scatter_base_"}
                              if form == "tensor" else {"c10d::allgather_", "c10d::allreduce_"})
        assert torch.equal(res["gathered"], want) and torch.equal(res["unknown"], want)
        assert res["bf16"].dtype == torch.bfloat16 and torch.equal(res["bf16"].double(), want)
        lo = sum(sizes[:rank])
        torch.testing.assert_close(res["grad"], summed[lo:lo + sizes[rank]], rtol=1e-14, atol=0)
        assert res["header"] == [[n, 7 * r] for r, n in enumerate(sizes)]


def test_no_group_is_one_process():
    x = _rows(0, 3)
    assert collectives.all_gather_rows(x, [3], None) is x
    assert collectives.gather_header(torch.tensor([3, 1])) == [[3, 1]]
    torch.testing.assert_close(collectives.all_reduce(x), x, rtol=0, atol=0)
