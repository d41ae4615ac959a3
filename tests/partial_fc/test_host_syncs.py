"""Host synchronisations of one classifier step (forward, backward, the row-sparse optimizer's
step), counted by the profiler: a small constant, whatever the world size, the number of class
blocks, the sweep or the optimizer (docs/ALGORITHM.md, section 5b).

Counted: every device-to-host read (``aten::_local_scalar_dense``: ``.item()``, ``int()``,
``bool()`` of a tensor; the classifier's own marked reads, ``partial_fc::host_read``) and the
operators whose output size depends on the data, which wait for the device on CUDA
(``nonzero``, ``unique``, ``masked_select``).
"""
import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import npc_head
import partial_fc
from partial_fc.classifier.collectives import HOST_SYNC_EVENTS as SYNC_EVENTS
from partial_fc.optim import build_classifier_optimizer

from tests.helpers.dist_harness import run_workers
from tests.helpers.margin_reference import make_problem

C, D = 90, 8
# (name, PartialFC arguments, optimizer): one block of classes against many, both sweeps, the
# reference path, sampling (rows above and below the sample), both optimizers.
CONFIGS = [
    ("classes, one block", dict(impl="chunked", sweep="classes", block_size=1024), "sgd"),
    ("classes, blocks of 4", dict(impl="chunked", sweep="classes", block_size=4), "sgd"),
    ("rows", dict(impl="chunked", sweep="rows"), "sgd"),
    ("reference", dict(impl="reference"), "sgd"),
    ("adamw, blocks of 4", dict(impl="chunked", sweep="classes", block_size=4), "adamw"),
    ("sampled, blocks of 4", dict(impl="chunked", sweep="classes", block_size=4,
                                  sample_rate=0.5), "sgd"),
    ("sampled, reference", dict(impl="reference", sample_rate=0.5), "adamw"),
    ("sampled, rows beyond the sample", dict(impl="chunked", sweep="rows", sample_rate=0.05),
     "sgd"),
]
BATCH = {1: [12], 3: [5, 4, 3]}


def _syncs_worker(rank, world_size):
    group = dist.group.WORLD if world_size > 1 else None
    sizes = BATCH[world_size]
    lo = sum(sizes[:rank])
    weight, emb, labels = make_problem(C, D, sum(sizes), seed=2)
    counts = {}
    for name, kw, optimizer in CONFIGS:
        module = partial_fc.PartialFC(npc_head.NPCFace(), D, C, fused=False, process_group=group,
                                      **kw)
        with torch.no_grad():
            module.weight.copy_(weight[module.class_start:module.class_start + module.num_local])
        opt = build_classifier_optimizer(module, optimizer, lr=0.1)
        e = emb[lo:lo + sizes[rank]].float()

        def step():
            module(e.clone().requires_grad_(True), labels[lo:lo + sizes[rank]]).backward()
            opt.step()
            opt.zero_grad()

        step()  # the first step reads the sampling counter once; later steps need not
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        counts[name] = sum(e.count for e in prof.key_averages() if e.key in SYNC_EVENTS)
    return counts


def test_a_classifier_step_syncs_a_constant_few_times_on_one_and_three_ranks():
    one = run_workers(_syncs_worker, 1)[0]
    three = run_workers(_syncs_worker, 3)
    for counts in three:
        assert counts == one, (counts, one)
    # The step's header (sizes, label check, tiles; one all-gather) is the one read; sampling
    # adds the positive count only when the batch has more labels than a rank samples rows.
    for name, count in one.items():
        assert count == (2 if "beyond" in name else 1), (name, count)
