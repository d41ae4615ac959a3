"""PartialFC over 1-4 gloo ranks against the single-process float64 reference."""
import pytest
import torch

import partial_fc

from tests.helpers.dist_harness import run_workers
from tests.helpers.margin_reference import make_head, make_problem, reference_loss

NPC_DEFAULT = dict(s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2)
NPC_OTHER = dict(s=32.0, m0=0.3, m1=0.5, t=1.3, alpha=0.15, hard_margin=0.2)
ARC = dict(s=64.0, m=0.5)
COS = dict(s=30.0, m=0.35)

CASES = [
    # (kind, head params, num_classes, dim, sample_rate, problem seed); batch sizes: BATCHES
    ("npcface", NPC_DEFAULT, 37, 16, 1.0, 0),
    ("npcface", NPC_OTHER, 37, 16, 1.0, 1),
    ("arcface", ARC, 37, 16, 1.0, 2),
    ("cosface", COS, 37, 16, 1.0, 3),
    ("npcface", NPC_DEFAULT, 41, 8, 0.4, 4),
    ("arcface", ARC, 41, 8, 0.5, 5),
]

BATCHES = {1: [11], 2: [7, 4], 3: [5, 3, 7], 4: [6, 1, 0, 5]}


def _offsets(sizes):
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def _case_worker(rank, world_size):
    torch.manual_seed(1234)
    results = []
    sizes = BATCHES[world_size]
    for kind, params, C, D, rate, seed in CASES:
        weight, emb, labels = make_problem(C, D, sum(sizes), seed)
        start, count = partial_fc.shard_range(C, world_size, rank)
        lo = _offsets(sizes)[rank]
        local_emb = emb[lo : lo + sizes[rank]].clone().requires_grad_(True)
        local_labels = labels[lo : lo + sizes[rank]].clone()
        emb_before, labels_before = local_emb.detach().clone(), local_labels.clone()

        module = partial_fc.PartialFC(make_head(kind, params), D, C, sample_rate=rate, seed=seed)
        module = module.double()
        with torch.no_grad():
            module.weight.copy_(weight[start : start + count])
        loss = module(local_emb, local_labels)
        loss.backward()
        first_index = module.sampled_index.clone()
        # A second module with the same seed draws the same classes at the same step.
        twin = partial_fc.PartialFC(make_head(kind, params), D, C, sample_rate=rate, seed=seed)
        twin = twin.double()
        with torch.no_grad():
            twin.weight.copy_(weight[start : start + count])
        twin(local_emb.detach(), local_labels)
        # ... and the next step draws again.
        module(local_emb.detach(), local_labels)
        results.append(
            dict(
                loss=loss.detach(),
                emb_grad=local_emb.grad.clone(),
                weight_grad=module.weight.grad.clone(),
                start=start,
                sampled=first_index + start,
                twin_sampled=twin.sampled_index + start,
                next_sampled=module.sampled_index + start,
                emb_unchanged=bool(torch.equal(local_emb.detach(), emb_before)),
                labels_unchanged=bool(torch.equal(local_labels, labels_before)),
            )
        )
    return results


def _stats_worker(rank, world_size):
    """last_stats of one NPCFace step (no sampling) on every rank."""
    sizes = BATCHES[world_size]
    C, D = 37, 16
    weight, emb, labels = make_problem(C, D, sum(sizes), 0)
    start, count = partial_fc.shard_range(C, world_size, rank)
    lo = _offsets(sizes)[rank]
    module = partial_fc.PartialFC(make_head("npcface", NPC_DEFAULT), D, C).double()
    with torch.no_grad():
        module.weight.copy_(weight[start : start + count])
    module(emb[lo : lo + sizes[rank]], labels[lo : lo + sizes[rank]])
    stats = {k: v.clone() for k, v in module.last_stats.items()}
    # bfloat16 embeddings travel through gloo too; statistics stay in float64.
    low = partial_fc.PartialFC(make_head("npcface", NPC_DEFAULT), D, C)
    with torch.no_grad():
        low.weight.copy_(weight[start : start + count].float())
    e = emb[lo : lo + sizes[rank]].to(torch.bfloat16).requires_grad_(True)
    loss = low(e, labels[lo : lo + sizes[rank]])
    loss.backward()
    stats["bf16_loss"] = loss.detach().double()
    stats["bf16_grad_finite"] = bool(torch.isfinite(e.grad.float()).all()) and e.grad.dtype == torch.bfloat16
    return stats


def _check_world(world_size, results):
    sizes = BATCHES[world_size]
    offsets = _offsets(sizes)
    for ci, (kind, params, C, D, rate, seed) in enumerate(CASES):
        weight, emb, labels = make_problem(C, D, sum(sizes), seed)
        per_rank = [r[ci] for r in results]
        sampled = torch.cat([r["sampled"] for r in per_rank]).tolist()
        # Positives are always scored; with rate < 1 some negatives are not.
        assert set(labels.tolist()) <= set(sampled)
        if rate < 1.0:
            assert len(sampled) < C
            for res in per_rank:
                assert torch.equal(res["sampled"], res["twin_sampled"]), "same seed, same classes"
        w = weight.clone().requires_grad_(True)
        e = emb.clone().requires_grad_(True)
        ref_loss, _ = reference_loss(kind, params, e, w, labels, classes=sampled)
        ref_loss.backward()
        scale_e = e.grad.abs().max()
        scale_w = w.grad.abs().max()
        for r, res in enumerate(per_rank):
            torch.testing.assert_close(res["loss"], ref_loss.detach(), rtol=1e-10, atol=0)
            lo = offsets[r]
            torch.testing.assert_close(
                res["emb_grad"], e.grad[lo : lo + sizes[r]], rtol=1e-10, atol=1e-10 * scale_e
            )
            start = res["start"]
            count = res["weight_grad"].shape[0]
            torch.testing.assert_close(
                res["weight_grad"], w.grad[start : start + count], rtol=1e-10, atol=1e-10 * scale_w
            )
            assert res["emb_unchanged"] and res["labels_unchanged"]
    # Sampling: ranks draw differently, and so do consecutive steps.
    sampled_cases = [ci for ci, case in enumerate(CASES) if case[4] < 1.0]
    for ci in sampled_cases:
        assert any(
            not torch.equal(r[ci]["sampled"], r[ci]["next_sampled"]) for r in results
        ), "the next step should draw other negatives"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_loss_and_gradients_match_float64_reference(world_size):
    results = run_workers(_case_worker, world_size)
    _check_world(world_size, results)


@pytest.mark.parametrize("world_size", [3])
def test_npcface_statistics_and_bf16_over_gloo(world_size):
    results = run_workers(_stats_worker, world_size)
    sizes = BATCHES[world_size]
    weight, emb, labels = make_problem(37, 16, sum(sizes), 0)
    _, ref = reference_loss("npcface", NPC_DEFAULT, emb, weight, labels)
    ref_loss, _ = reference_loss("npcface", NPC_DEFAULT, emb, weight, labels)
    for stats in results:
        assert stats["bf16_grad_finite"]
        assert abs(float(stats["bf16_loss"]) - float(ref_loss)) <= 5e-2 * float(ref_loss)
        torch.testing.assert_close(stats["margin"], ref["margin"], rtol=1e-12, atol=1e-12)
        assert torch.equal(stats["hard_count"], ref["hard_count"])
    # The regimes the problem is built to contain are present.
    assert (ref["hard_count"] == 0).any(), "a row with no hard negatives"
    assert (ref["hard_count"] == 36).any(), "a row where every negative is hard"
