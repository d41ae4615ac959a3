"""The step's plan (partial_fc/classifier/plan.py) is made from values every rank shares: at each
threshold (reference or chunked path, class or row sweep, the row sweep's chunk size, sampling's
positive count), ranks whose own row counts straddle it still take one plan, train with the
results of one process, and send what the traffic model (partial_fc/classifier/traffic.py) says."""
import pytest
import torch
import torch.distributed as dist

import npc_head
import partial_fc
from partial_fc.classifier import plan as step_plan
from partial_fc.classifier.plan import (AUTO_CHUNKED_LOGIT_BYTES, MIN_CHUNK_ROWS, ROW_TILE_ELEMENTS,
                                        StepPlan, plan_step, scored_bound)
from partial_fc.classifier.traffic import step_collectives
from partial_fc.optim import build_classifier_optimizer

from tests.helpers.collective_recorder import CollectiveRecorder
from tests.helpers.dist_harness import run_workers
from tests.helpers.margin_reference import make_head, make_problem, reference_loss


def test_auto_takes_the_chunked_path_past_the_logit_budget_of_the_most_any_rank_scores():
    rows = 1024
    edge = AUTO_CHUNKED_LOGIT_BYTES // (4 * rows)  # 16384 classes: exactly 64 MiB of logits
    assert plan_step("auto", "auto", rows, edge, "cpu", False).impl == "reference"
    assert plan_step("auto", "auto", rows, edge + 1, "cpu", False).impl == "chunked"
    # 32769 classes on 2 ranks: 16385 and 16384 rows; both ranks plan with rank 0's count.
    assert [scored_bound(32769, 2, 1.0, rows, True)] * 2 == [edge + 1] * 2
    assert plan_step("reference", "rows", rows, 10**9, "cpu", True) == StepPlan("reference")


def test_the_scored_bound_follows_sampling_and_the_batch():
    # 1000 classes over 3 ranks: rank 0 owns 334. rate 0.1: 33 sampled rows per rank...
    assert scored_bound(1000, 3, 0.1, 20, True) == 33
    # ... unless the batch's labels could be more positives than that (at most the batch).
    assert scored_bound(1000, 3, 0.1, 40, True) == 40
    assert scored_bound(1000, 3, 0.1, 4000, True) == 334
    assert scored_bound(1000, 3, 0.1, 40, False) == 334  # evaluation scores every row
    assert scored_bound(1000, 3, 0.999, 40, True) == 333  # int(0.999 * 334): still sampling
    assert scored_bound(1000, 3, 1.0, 40, True) == 334


def test_the_row_sweep_needs_compiled_tiles_and_a_chunk_of_enough_rows_under_auto():
    budget, least = ROW_TILE_ELEMENTS["cpu"], MIN_CHUNK_ROWS["cpu"]
    fits = budget // least  # the most classes a chunk of `least` rows may hold
    assert plan_step("chunked", "auto", 1024, fits, "cpu", True).chunk_rows == 1024 // 8
    assert plan_step("chunked", "auto", 1024, fits + 1, "cpu", True).sweep == "classes"
    assert plan_step("chunked", "auto", 1024, 1000, "cpu", False).sweep == "classes"
    forced = plan_step("chunked", "rows", 1024, fits + 1, "cpu", False)
    assert forced.sweep == "rows" and forced.chunk_rows * (fits + 1) <= budget
    assert plan_step("chunked", "rows", 0, 10, "cpu", True).sweep == "classes"  # empty batch
    assert plan_step("chunked", "classes", 1024, 10, "cpu", True, block_size=7).block_size == 7


# ------------------------------------------------------------ the issue's case: 2 gloo ranks
ISSUE_C, ISSUE_D, ISSUE_ROWS, ISSUE_STEPS = 32769, 8, 512, 3


def _issue_batches(world_size):
    g = torch.Generator().manual_seed(5)
    rows = ISSUE_ROWS * 2
    return [(torch.randn(rows, ISSUE_D, generator=g, dtype=torch.float64),
             torch.randint(0, ISSUE_C, (rows,), generator=g)) for _ in range(ISSUE_STEPS)]


def _issue_worker(rank, world_size):
    """``PartialFC(npc_head.NPCFace(), 8, 32769)``, defaults untouched (float64), trained for a
    few SGD steps on ``ISSUE_ROWS`` rows per rank (one process: all of them)."""
    torch.manual_seed(0)
    weight = torch.randn(ISSUE_C, ISSUE_D, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64) * 0.01
    group = dist.group.WORLD if world_size > 1 else None
    module = partial_fc.PartialFC(npc_head.NPCFace(), ISSUE_D, ISSUE_C, process_group=group)
    module = module.double()
    with torch.no_grad():
        module.weight.copy_(weight[module.class_start:module.class_start + module.num_local])
    opt = build_classifier_optimizer(module, "sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    per_rank = ISSUE_ROWS * 2 // world_size
    losses, plans = [], []
    for emb, labels in _issue_batches(world_size):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = module(emb[rows], labels[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        plans.append(module.last_plan)
    return dict(losses=losses, plans=plans, weight=module.weight.detach().clone())


def test_the_issue_case_trains_on_two_ranks_with_the_loss_of_one_process():
    """Rank 0 owns 16,385 classes (its logits would pass 64 MiB), rank 1 16,384 (they would
    not): both take the chunked path, and three SGD steps give one process's losses and
    weights."""
    one = _issue_worker(0, 1)
    two = run_workers(_issue_worker, 2, timeout=600)
    for res in two:
        assert res["plans"] == two[0]["plans"] and res["plans"][0].impl == "chunked"
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(one["losses"]),
                                   rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.cat([r["weight"] for r in two]), one["weight"], rtol=1e-9,
                               atol=1e-12)
    assert one["losses"][-1] < one["losses"][0]


# ---------------------------------- every threshold, shrunk to small problems, on 2-3 ranks
BATCH = {2: [13, 11], 3: [9, 7, 8]}  # 24 global rows
# Budgets for 24 rows: the reference path up to 20 scored classes; row chunks of at most 25 x 24
# elements (one chunk up to 25 classes, two from 26); the class sweep's blocks of 5 classes.
SMALL = dict(logit_bytes=4 * 24 * 20, row_elements=25 * 24, block=5)
NPC = dict(s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2)


def _cases(world_size):
    """(classes, sample rate, impl, sweep) around each threshold, rank 0 owning one class more
    than the others where the count is W * n + 1."""
    w = world_size
    cases = [(w * 20, 1.0, "auto", "auto"), (w * 20 + 1, 1.0, "auto", "auto"),  # path
             (w * 25, 1.0, "chunked", "rows"), (w * 25 + 1, 1.0, "chunked", "rows"),  # chunks
             (w * 20 + 1, 1.0, "chunked", "classes")]
    # Sampling: 100 rows on rank 0, int(rate * 100) sampled against the 24 labels.
    cases += [(w * 100 - 1, rate, "auto", "auto") for rate in (0.23, 0.24, 0.25)]
    cases += [(w * 100 - 1, rate, "chunked", "rows") for rate in (0.05, 0.24)]
    return cases


def _threshold_worker(rank, world_size):
    step_plan.AUTO_CHUNKED_LOGIT_BYTES = SMALL["logit_bytes"]
    step_plan.ROW_TILE_ELEMENTS["cpu"] = SMALL["row_elements"]
    sizes = BATCH[world_size]
    lo = sum(sizes[:rank])
    out = []
    for C, rate, impl, sweep in _cases(world_size):
        weight, emb, labels = make_problem(C, 8, sum(sizes), seed=C)
        module = partial_fc.PartialFC(make_head("npcface", NPC), 8, C, sample_rate=rate, seed=7,
                                      impl=impl, sweep=sweep, block_size=SMALL["block"],
                                      fused=False, process_group=dist.group.WORLD).double()
        with torch.no_grad():
            module.weight.copy_(weight[module.class_start:module.class_start + module.num_local])
        e = emb[lo:lo + sizes[rank]].clone().requires_grad_(True)
        with CollectiveRecorder() as recorder:
            loss = module(e, labels[lo:lo + sizes[rank]])
            loss.backward()
        out.append(dict(loss=loss.detach(), emb_grad=e.grad, weight_grad=module.weight.grad,
                        sent=recorder.calls,
                        start=module.class_start, plan=module.last_plan,
                        sampled=module.sampled_index + module.class_start))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_straddling_each_threshold_take_one_plan_and_the_reference_results(world_size):
    results = run_workers(_threshold_worker, world_size)
    sizes = BATCH[world_size]
    plans = set()
    for ci, (C, rate, impl, sweep) in enumerate(_cases(world_size)):
        per_rank = [r[ci] for r in results]
        assert all(res["plan"] == per_rank[0]["plan"] for res in per_rank), (C, rate)
        plans.add(per_rank[0]["plan"])
        weight, emb, labels = make_problem(C, 8, sum(sizes), seed=C)
        sampled = torch.cat([r["sampled"] for r in per_rank]).tolist()
        w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        ref, _ = reference_loss("npcface", NPC, e, w, labels, classes=sampled)
        ref.backward()
        for rank, res in enumerate(per_rank):
            lo = sum(sizes[:rank])
            torch.testing.assert_close(res["loss"], ref.detach(), rtol=1e-10, atol=0)
            torch.testing.assert_close(res["emb_grad"], e.grad[lo:lo + sizes[rank]], rtol=1e-10,
                                       atol=1e-10 * e.grad.abs().max())
            rows = slice(res["start"], res["start"] + res["weight_grad"].shape[0])
            torch.testing.assert_close(res["weight_grad"], w.grad[rows], rtol=1e-10,
                                       atol=1e-10 * w.grad.abs().max())
        # What the step sent, message by message, is what the traffic model says (the preflight
        # times these messages).
        model = step_collectives(per_rank[0]["plan"], sizes, 8, 2, torch.float64, torch.float64)
        assert all(res["sent"] == [(c.op, c.nbytes) for c in model] for res in per_rank), (C, rate)
    # Each side of each threshold was reached: both paths, one and two row chunks.
    assert {p.impl for p in plans} == {"reference", "chunked"}
    assert {p.chunk_rows for p in plans if p.sweep == "rows"} >= {24, 12}
