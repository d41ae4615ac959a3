"""MV-Softmax and CurricularFace, sharded (1-3 gloo ranks, reference and chunked paths), against
float64 references; CurricularFace's running t across ranks and through trainer checkpoints."""
import math

import pytest
import torch
import torch.distributed as dist

import npc_head
import partial_fc
from npc_head.base import MarginHead

from tests.helpers.dist_harness import run_workers
from tests.helpers.head_checkpoint import resume_worker
from tests.helpers.margin_reference import make_problem
from tests.helpers.paper_reference import curricular_t_after, make_paper_head, reference_loss

MV_CASES = [
    ("mv", dict(s=32.0, m=0.35, t=1.2, arc=True, fixed=False)),
    ("mv", dict(s=32.0, m=0.5, t=1.3, arc=True, fixed=True)),
    ("mv", dict(s=30.0, m=0.35, t=1.2, arc=False, fixed=False)),
    ("mv", dict(s=30.0, m=0.3, t=1.25, arc=False, fixed=True)),
]
CURRICULAR = ("curricular", dict(s=64.0, m=0.5))
CASES = MV_CASES + [CURRICULAR]
IMPLS = [("reference", None), ("chunked", 4), ("chunked", 64)]
T_START = 0.45  # a non-trivial running t for CurricularFace (as after some training)


def _module(kind, params, D, C, impl, block, rate=1.0, seed=0, group=None):
    head = make_paper_head(kind, params)
    module = partial_fc.PartialFC(head, D, C, sample_rate=rate, seed=seed, impl=impl,
                                  block_size=block, process_group=group, fused=False).double()
    if kind == "curricular":
        head.t.fill_(T_START)
    return module


def _assert_close(got, want, rtol=1e-10):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("kind,params", CASES)
def test_single_process_matches_float64_reference(kind, params, impl, block):
    C, D = 37, 16
    weight, emb, labels = make_problem(C, D, 13, seed=3)
    module = _module(kind, params, D, C, impl, block)
    with torch.no_grad():
        module.weight.copy_(weight)
    e = emb.clone().requires_grad_(True)
    loss = module(e, labels)
    loss.backward()
    assert module.last_impl == impl

    t_used = curricular_t_after(T_START, emb, weight, labels) if kind == "curricular" else 0.0
    w_ref, e_ref = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref = reference_loss(kind, params, e_ref, w_ref, labels, t_value=t_used)
    ref.backward()
    _assert_close(loss.detach(), ref.detach())
    _assert_close(e.grad, e_ref.grad)
    _assert_close(module.weight.grad, w_ref.grad)
    if kind == "curricular":
        assert float(module.head.t) == pytest.approx(t_used, rel=1e-14, abs=1e-15)
        assert torch.equal(module.last_stats["t"], torch.full((13,), t_used, dtype=torch.float64))


def test_problem_contains_hard_and_easy_negatives_for_every_head():
    """The references only test something if the masks are neither empty nor full."""
    weight, emb, labels = make_problem(37, 16, 13, seed=3)
    e = emb / emb.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    cos = (e @ w.t()).clamp(-1, 1)
    cy = cos[torch.arange(13), labels]
    for tau in (torch.cos(torch.acos(cy) + 0.35), cy - 0.35, torch.cos(torch.acos(cy) + 0.5)):
        hard = (cos > tau[:, None]).sum(dim=1)
        assert (hard <= 1).any() and (hard >= 30).any() and ((hard > 1) & (hard < 30)).any()
    assert (cy < 0).any() and (cy > 0.9).any()
    assert (cy < math.cos(math.pi - 0.5)).any(), "CurricularFace's fallback branch is exercised"


def test_mv_arc_softmax_is_npcface_without_collaboration():
    weight, emb, labels = make_problem(37, 16, 13, seed=5)
    mv = partial_fc.PartialFC(npc_head.MVSoftmax(s=32.0, m=0.35, t=1.2), 16, 37).double()
    npc = partial_fc.PartialFC(
        npc_head.NPCFace(s=32.0, m0=0.35, m1=0.0, t=1.2, alpha=0.2), 16, 37).double()
    with torch.no_grad():
        mv.weight.copy_(weight)
        npc.weight.copy_(weight)
    torch.testing.assert_close(mv(emb, labels), npc(emb, labels), rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind,params", CASES)
def test_closed_form_slopes_equal_autograd(kind, params):
    head = make_paper_head(kind, params)
    if kind == "curricular":
        head.t.fill_(0.3)
    g = torch.Generator().manual_seed(0)
    prep = head.prepare(torch.rand(9, generator=g, dtype=torch.float64) * 2 - 1,
                        torch.ones(9, dtype=torch.float64))
    cos = torch.rand(9, 50, generator=g, dtype=torch.float64) * 2 - 1
    closed = head.negative_logit_slope(cos, prep)
    generic = MarginHead.negative_logit_slope(head, cos, prep)
    torch.testing.assert_close(closed, generic, rtol=1e-14, atol=1e-14)


def test_curricular_t_updates_only_in_training_and_before_use():
    weight, emb, labels = make_problem(23, 8, 10, seed=7)
    module = partial_fc.PartialFC(npc_head.CurricularFace(s=64.0, m=0.5), 8, 23).double()
    with torch.no_grad():
        module.weight.copy_(weight)
    assert float(module.head.t) == 0.0 and "t" in module.head.state_dict()
    expected = 0.0
    for _ in range(3):
        module(emb, labels)
        expected = curricular_t_after(expected, emb, weight, labels)
        assert float(module.head.t) == pytest.approx(expected, rel=1e-14)
    # The loss of a training forward uses the updated t (the authors' order).
    module.head.t.fill_(0.2)
    loss = module(emb, labels)
    t_used = curricular_t_after(0.2, emb, weight, labels)
    ref = reference_loss("curricular", dict(s=64.0, m=0.5), emb, weight, labels, t_value=t_used)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    module.eval()
    before = module.head.t.clone()
    eval_loss = module(emb, labels)
    assert torch.equal(module.head.t, before)
    ref = reference_loss("curricular", dict(s=64.0, m=0.5), emb, weight, labels,
                         t_value=float(before))
    torch.testing.assert_close(eval_loss, ref, rtol=1e-10, atol=0)


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="t must be"):
        npc_head.MVSoftmax(t=0.9)
    with pytest.raises(ValueError, match="m must be"):
        npc_head.MVSoftmax(m=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        npc_head.CurricularFace(momentum=0.0)


# ---------------------------------------------------------------------------- gloo ranks
BATCHES = {2: [7, 4], 3: [5, 3, 6]}
DIST_CASES = [  # (case index into CASES, sample_rate)
    (0, 1.0), (1, 0.5), (2, 1.0), (3, 0.5), (4, 1.0), (4, 0.5),
]


def _offsets(sizes):
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _dist_worker(rank, world_size):
    sizes = BATCHES[world_size]
    lo = _offsets(sizes)[rank]
    C, D = 37, 16
    results = []
    for ci, rate in DIST_CASES:
        kind, params = CASES[ci]
        weight, emb, labels = make_problem(C, D, sum(sizes), seed=10 + ci)
        start, count = partial_fc.shard_range(C, world_size, rank)
        for impl, block in IMPLS:
            module = _module(kind, params, D, C, impl, block, rate=rate, seed=ci,
                             group=dist.group.WORLD)
            with torch.no_grad():
                module.weight.copy_(weight[start:start + count])
            e = emb[lo:lo + sizes[rank]].clone().requires_grad_(True)
            loss = module(e, labels[lo:lo + sizes[rank]])
            loss.backward()
            out = dict(loss=loss.detach(), emb_grad=e.grad.clone(),
                       weight_grad=module.weight.grad.clone(), start=start,
                       sampled=module.sampled_index + start)
            if kind == "curricular":
                ts = [module.head.t.clone()]
                for _ in range(2):  # further training steps: t keeps agreeing across ranks
                    module(e.detach(), labels[lo:lo + sizes[rank]])
                    ts.append(module.head.t.clone())
                out["t"] = ts
            results.append(out)
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_heads_match_float64_reference_over_gloo(world_size):
    results = run_workers(_dist_worker, world_size)
    sizes = BATCHES[world_size]
    offsets = _offsets(sizes)
    C, D = 37, 16
    index = 0
    for ci, rate in DIST_CASES:
        kind, params = CASES[ci]
        weight, emb, labels = make_problem(C, D, sum(sizes), seed=10 + ci)
        for _ in IMPLS:
            per_rank = [r[index] for r in results]
            index += 1
            sampled = torch.cat([r["sampled"] for r in per_rank]).tolist()
            if rate < 1.0:
                assert len(sampled) < C
            t_used = curricular_t_after(T_START, emb, weight, labels) if kind == "curricular" else 0.0
            w = weight.clone().requires_grad_(True)
            e = emb.clone().requires_grad_(True)
            ref = reference_loss(kind, params, e, w, labels, classes=sampled, t_value=t_used)
            ref.backward()
            for r, res in enumerate(per_rank):
                _assert_close(res["loss"], ref.detach())
                _assert_close(res["emb_grad"], e.grad[offsets[r]:offsets[r] + sizes[r]])
                count = res["weight_grad"].shape[0]
                _assert_close(res["weight_grad"], w.grad[res["start"]:res["start"] + count])
            if kind == "curricular":
                expected = T_START
                for step in range(3):
                    expected = curricular_t_after(expected, emb, weight, labels)
                    values = [res["t"][step] for res in per_rank]
                    assert all(torch.equal(v, values[0]) for v in values), "t differs across ranks"
                    assert float(values[0]) == pytest.approx(expected, rel=1e-13)


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("world_size", [1, 2])
def test_curricular_t_is_saved_and_restored_by_the_trainer(tmp_path, world_size):
    results = run_workers(resume_worker, world_size, str(tmp_path), "curricularface")
    for res in results:
        assert float(res["after_two"]["t"]) > 0.0 and float(res["fresh"]["t"]) == 0.0
        assert torch.equal(res["saved"]["t"], res["after_two"]["t"])
        assert torch.equal(res["restored"]["t"], res["after_two"]["t"])
        assert torch.equal(res["resumed"]["t"], res["straight"]["t"])
        assert res["resumed_loss"] == pytest.approx(res["straight_loss"], rel=1e-6)
        assert res["record"]["head/t"] == pytest.approx(float(res["straight"]["t"]), rel=1e-6)
    assert all(torch.equal(r["straight"]["t"], results[0]["straight"]["t"]) for r in results)
