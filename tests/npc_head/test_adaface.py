"""AdaFace (npc_head/adaface.py) against a float64 per-row reference written from the authors'
code (tests/helpers/paper_reference.py): alone through its protocol, through PartialFC on both
paths over 1-3 gloo ranks (uneven shards and batches, with sampling), its running batch mean /
std equal on every rank, and through the trainer's checkpoints."""
import math

import pytest
import torch
import torch.distributed as dist

import npc_head
import partial_fc

from tests.helpers.dist_harness import run_workers
from tests.helpers.head_checkpoint import resume_worker
from tests.helpers.head_protocol import (assert_slope_is_the_derivative, protocol_loss,
                                         random_cosines)
from tests.helpers.margin_reference import make_problem, row_cross_entropy
from tests.helpers.paper_reference import (adaface_buffers_after, adaface_reference_loss,
                                           adaface_row_logits, adaface_scaler)

PARAMS = dict(s=64.0, m=0.4, h=0.333)
# Norms spanning the clip at both ends and both ends of the scaler's clip, around a mean of 20.
NORMS = [1e-5, 0.5, 3.0, 9.0, 14.0, 18.0, 20.0, 22.0, 26.0, 31.0, 45.0, 80.0, 150.0, 500.0]
TOL = 1e-8


def _norms(rows):
    return torch.tensor((NORMS * rows)[:rows], dtype=torch.float64)


def _close(got, want, rtol=TOL):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("t_alpha", [1.0, 0.01])
@pytest.mark.parametrize("training", [True, False])
def test_loss_gradient_and_buffers_match_the_authors_code(t_alpha, training):
    head = npc_head.AdaFace(**PARAMS, t_alpha=t_alpha).double().train(training)
    head.batch_mean.fill_(17.0)
    head.batch_std.fill_(3.0)
    cos, labels = random_cosines(seed=11)
    norms = _norms(cos.shape[0])
    mean, std = (adaface_buffers_after(17.0, 3.0, norms.tolist(), t_alpha) if training
                 else (17.0, 3.0))
    c = cos.clone().requires_grad_(True)
    loss, prep, stats = protocol_loss(head, c, labels, norms)
    loss.sum().backward()
    ref_c = cos.clone().requires_grad_(True)
    ref = []
    for i in range(cos.shape[0]):
        y = int(labels[i])
        z = adaface_scaler(float(norms[i]), mean, std, PARAMS["h"])
        negatives = [k for k in range(cos.shape[1]) if k != y]
        pos, neg = adaface_row_logits(ref_c[i, y], ref_c[i, negatives], z, PARAMS["m"])
        ref.append(row_cross_entropy(PARAMS["s"], pos, neg))
    torch.stack(ref).sum().backward()
    _close(loss.detach(), torch.stack(ref).detach(), 1e-12)
    _close(c.grad, ref_c.grad, 1e-12)
    assert stats is None
    assert (float(head.batch_mean), float(head.batch_std)) == pytest.approx((mean, std), rel=1e-14)
    z = head.diagnostics(prep, stats)["margin_scaler"]
    assert ((z > -1) & (z < 1)).any()
    if t_alpha < 1 or not training:  # buffers near the norms: both clips of z occur
        assert (z == 1.0).any() and (z == -1.0).any()
    assert_slope_is_the_derivative(head, cos, prep)  # negatives are the cosines themselves


def test_margin_scaler_and_its_clips_follow_the_formula():
    """z = clip((clip(n, 0.001, 100) - mean) / (std + 1e-3) * h, -1, 1), with the buffers as
    updated by this batch; the norms carry no gradient and the target angle is clipped."""
    head = npc_head.AdaFace(s=64.0, m=0.4, h=0.5, t_alpha=1.0).double()
    norms = torch.tensor([1e-6, 10.0, 30.0, 1e4], dtype=torch.float64, requires_grad=True)
    prep = head.prepare(torch.zeros(4, dtype=torch.float64), norms)
    safe = [0.001, 10.0, 30.0, 100.0]
    mean = sum(safe) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in safe) / 3)
    want = [max(-1.0, min(1.0, (x - mean) / (std + 1e-3) * 0.5)) for x in safe]
    torch.testing.assert_close(prep["z"], torch.tensor(want, dtype=torch.float64), rtol=1e-14,
                               atol=1e-15)
    assert not prep["z"].requires_grad
    # theta - m z clipped into [1e-3, pi - 1e-3]: c_y = 1 with z < 0 stays at cos(1e-3) - m(1+z)
    cy = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    prep = {"z": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    positive = head.positive_logit(cy, prep, None)
    want = [math.cos(1e-3) - 0.8, math.cos(math.pi - 1e-3) - 0.0]
    torch.testing.assert_close(positive.detach(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-14, atol=1e-14)
    positive.sum().backward()
    assert cy.grad.tolist() == [0.0, 0.0]  # both clipped: no gradient, as the authors' clamp


def test_buffers_move_only_in_training_mode_and_not_for_a_single_row():
    head = npc_head.AdaFace(t_alpha=0.5).double()
    head.eval().prepare(torch.zeros(3, dtype=torch.float64), _norms(3))
    assert (float(head.batch_mean), float(head.batch_std)) == (20.0, 100.0)
    head.train().prepare(torch.zeros(1, dtype=torch.float64), _norms(1))  # std undefined
    assert (float(head.batch_mean), float(head.batch_std)) == (20.0, 100.0)
    head.prepare(torch.zeros(3, dtype=torch.float64), _norms(3))
    want = adaface_buffers_after(20.0, 100.0, NORMS[:3], 0.5)
    assert (float(head.batch_mean), float(head.batch_std)) == pytest.approx(want, rel=1e-14)
    assert set(head.state_dict()) == {"batch_mean", "batch_std"}


def test_bad_hyper_parameters_are_rejected():
    for bad, match in ((dict(m=-0.1), "m must be"), (dict(h=-1.0), "h must be"),
                       (dict(t_alpha=0.0), "t_alpha must be"), (dict(t_alpha=1.5), "t_alpha"),
                       (dict(s=0.0), "scale s must be")):
        with pytest.raises(ValueError, match=match):
            npc_head.AdaFace(**bad)


# ------------------------------------------------------------- through PartialFC, gloo ranks
C, D, T_ALPHA = 37, 16, 0.3
BATCHES = {1: [13], 2: [7, 4], 3: [5, 3, 6]}
# (impl, fused/sweep keyword arguments, sample rate): both paths, both sweeps, sampling.
RUNS = [("reference", {}, 1.0), ("reference", {}, 0.5), ("chunked", dict(sweep="classes",
        block_size=4), 1.0), ("chunked", dict(sweep="rows"), 0.5),
        ("chunked", dict(sweep="classes", block_size=64), 0.5)]
STEPS = 2


def _problem(rows):
    weight, emb, labels = make_problem(C, D, rows, seed=31)
    scale = torch.tensor((NORMS * rows)[:rows], dtype=torch.float64)  # norms from 1e-5 to 500
    return weight, emb / emb.norm(dim=1, keepdim=True) * scale[:, None], labels


def _adaface_worker(rank, world_size):
    sizes = BATCHES[world_size]
    lo = sum(sizes[:rank])
    weight, emb, labels = _problem(sum(sizes))
    start, count = partial_fc.shard_range(C, world_size, rank)
    group = dist.group.WORLD if world_size > 1 else None
    results = []
    for impl, kw, rate in RUNS:
        head = npc_head.AdaFace(s=32.0, m=0.4, h=0.333, t_alpha=T_ALPHA)
        module = partial_fc.PartialFC(head, D, C, sample_rate=rate, seed=3, impl=impl,
                                      fused=False, process_group=group, **kw).double()
        with torch.no_grad():
            module.weight.copy_(weight[start:start + count])
        steps = []
        for _ in range(STEPS):  # the second step's margins use the first step's buffers
            module.weight.grad = None
            e = emb[lo:lo + sizes[rank]].clone().requires_grad_(True)
            loss = module(e, labels[lo:lo + sizes[rank]])
            loss.backward()
            steps.append(dict(loss=loss.detach(), emb_grad=e.grad, weight_grad=module.weight.grad,
                              sampled=module.sampled_index + start, start=start,
                              z=module.last_stats["margin_scaler"], plan=module.last_plan,
                              buffers=(head.batch_mean.clone(), head.batch_std.clone())))
        results.append(steps)
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_adaface_matches_the_float64_reference_with_sampling(world_size):
    results = run_workers(_adaface_worker, world_size)
    sizes = BATCHES[world_size]
    weight, emb, labels = _problem(sum(sizes))
    norms = emb.norm(dim=1).tolist()
    for ri, (impl, _, rate) in enumerate(RUNS):
        mean, std = 20.0, 100.0
        for step in range(STEPS):
            per_rank = [r[ri][step] for r in results]
            mean, std = adaface_buffers_after(mean, std, norms, T_ALPHA)
            sampled = torch.cat([r["sampled"] for r in per_rank]).tolist()
            if rate < 1.0:
                assert len(sampled) < C
            w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
            ref, z = adaface_reference_loss(dict(s=32.0, m=0.4, h=0.333), e, w, labels, mean, std,
                                            classes=sampled)
            ref.backward()
            for rank, res in enumerate(per_rank):
                lo = sum(sizes[:rank])
                assert res["plan"] == per_rank[0]["plan"] and res["plan"].impl == impl
                _close(res["loss"], ref.detach())
                _close(res["emb_grad"], e.grad[lo:lo + sizes[rank]])
                rows = slice(res["start"], res["start"] + res["weight_grad"].shape[0])
                _close(res["weight_grad"], w.grad[rows])
                _close(res["z"], z, 1e-12)
                assert all(torch.equal(a, b) for a, b in zip(res["buffers"],
                                                             per_rank[0]["buffers"]))
                assert [float(b) for b in res["buffers"]] == pytest.approx([mean, std], rel=1e-13)


@pytest.mark.parametrize("world_size", [1, 2])
def test_adaface_buffers_are_saved_and_restored_by_the_trainer(tmp_path, world_size):
    results = run_workers(resume_worker, world_size, str(tmp_path), "adaface")
    for res in results:
        assert [float(res["fresh"][k]) for k in ("batch_mean", "batch_std")] == [20.0, 100.0]
        for key in ("batch_mean", "batch_std"):
            assert float(res["after_two"][key]) != float(res["fresh"][key])
            assert torch.equal(res["saved"][key], res["after_two"][key])
            assert torch.equal(res["restored"][key], res["after_two"][key])
            assert torch.equal(res["resumed"][key], res["straight"][key])
            assert torch.equal(res["straight"][key], results[0]["straight"][key])
        assert res["resumed_loss"] == pytest.approx(res["straight_loss"], rel=1e-6)
