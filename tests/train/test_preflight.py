"""The preflight: its model of a step's collectives against the traffic of a real training step,
its warnings, its time budget, and the table of a real run (two torchrun agents)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import npc_head
from partial_fc.train import preflight
from partial_fc.train.config import ConfigError, validate_config
from partial_fc.classifier.plan import StepPlan
from partial_fc.classifier.traffic import Collective
from partial_fc.classifier.traffic import step_collectives as classifier_collectives
from partial_fc.train.preflight import Clock, Report, find_warnings, step_collectives

from tests.helpers.collective_recorder import CollectiveRecorder
from tests.helpers.dist_harness import run_workers
from tests.helpers.e2e import run_train
from tests.helpers.trainer_fixtures import DIM, make_trainer
from tests.train.test_config_refusals import _cfg
from tests.train.test_multinode import assert_all_ok, node_dir, node_overrides, run_nodes


def _recorded_step(rank, world_size, run_dir, impl, sweep, head, precision, grad_accum):
    trainer = make_trainer(run_dir, rank, world_size, batch_size=4, group=dist.group.WORLD, head=head,
                           precision=precision, grad_accum=grad_accum)
    trainer.classifier.impl, trainer.classifier.sweep, trainer.classifier.fused = impl, sweep, False
    for _ in range(2):  # DDP rebuilds its buckets (two broadcasts) at the second step, once
        trainer.train_step()
    with CollectiveRecorder() as recorder:
        trainer.train_step()
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainer.backbone.parameters())
    return recorder.calls, gradient_bytes, trainer.classifier.last_plan


@pytest.mark.parametrize("impl, sweep, head, precision, grad_accum", [
    ("auto", "auto", npc_head.NPCFace(s=16.0), "fp32", 1),  # auto resolves to reference at this size
    ("chunked", "classes", npc_head.NPCFace(s=16.0), "fp32", 2),
    ("chunked", "rows", npc_head.ArcFace(), "bf16", 1),  # no statistics; bf16 sent as fp32 by gloo
])
def test_the_modelled_collectives_are_what_a_real_training_step_sends(tmp_path, impl, sweep, head, precision,
                                                                      grad_accum):
    results = run_workers(_recorded_step, 2, str(tmp_path), impl, sweep, head, precision, grad_accum)
    calls, gradient_bytes, plan = results[0]
    assert all(r[0] == calls for r in results)  # every rank sends the same
    # the trainer hands the classifier fp32 embeddings under any precision
    classifier = classifier_collectives(plan, [4, 4], DIM, head.num_stats, torch.float32)
    model = step_collectives(classifier, gradient_bytes, grad_accum)
    expected = Counter()
    for c in model:
        expected[(c.op, c.nbytes)] += c.count
    assert Counter(calls) == expected


def test_bus_bandwidth_factors_are_nccl_tests():
    # doc/PERFORMANCE.md of nccl-tests: busBw = algBw * 2(n-1)/n (all-reduce), (n-1)/n (all-gather
    # of the total, here per rank part: n-1), (n-1)/n (reduce-scatter of the total).
    assert preflight.bus_factor("all_reduce", 4) == 1.5
    assert preflight.bus_factor("all_gather", 4) == 3
    assert preflight.bus_factor("reduce_scatter", 4) == 0.75


def test_backbone_gradients_go_in_a_first_bucket_of_one_mib_then_25_mib_ones():
    mib = 2**20
    assert preflight.ddp_bucket_bytes(100) == [100]
    assert preflight.ddp_bucket_bytes(60 * mib) == [mib, 25 * mib, 25 * mib, 9 * mib]
    classifier = classifier_collectives(StepPlan("reference"), [8, 8], 16, 0, backend="nccl")
    steps = step_collectives(classifier, 60 * mib, 3)
    buckets = [(c.nbytes, c.count) for c in steps if c.name.startswith("backbone")]
    assert buckets == [(mib, 1), (25 * mib, 2), (9 * mib, 1)]
    gradient = [c for c in steps if c.name == "embedding gradients"]
    assert gradient == [Collective("embedding gradients", "reduce_scatter", (16, 16), torch.float32, 3)]


def _report(links, comm_s=0.01, compute_s=0.09, hosts=("a", "b"), interface="eth0", address="10.0.0.1"):
    ranks = [{"rank": r, "host": hosts[r % len(hosts)], "interface": interface, "address": address,
              "source": "GLOO_SOCKET_IFNAME=eth0", "interfaces": "lo 127.0.0.1, eth0 10.0.0.1", "link_gbps": g}
             for r, g in enumerate(links)]
    return Report("gloo", len(links), ranks, [], compute_s, comm_s, 4 * 2**20, 5.0)


def test_a_rank_whose_link_is_far_below_the_median_is_named():
    assert find_warnings(_report([10.0, 9.0, 11.0, 10.5]), 0.25, 0.5) == []
    (warning,) = find_warnings(_report([10.0, 9.0, 0.3, 10.5]), 0.25, 0.5)
    assert warning.startswith("rank 2 on a (eth0) moves 0.3 GB/s, under 0.25 x the median rank's 9.5 GB/s")


def test_communication_above_its_share_of_the_step_is_warned_about():
    assert find_warnings(_report([1.0, 1.0], comm_s=0.04, compute_s=0.06), 0.25, 0.5) == []
    (warning,) = find_warnings(_report([1.0, 1.0], comm_s=0.36, compute_s=0.01), 0.25, 0.5)
    assert warning.startswith("the step's collectives are predicted to take 360 ms per step, 97% of a step "
                              "with the backbone's 10 ms (above trainer.preflight_max_comm_share=0.5)")


def test_an_interface_local_to_its_host_is_warned_about_only_when_ranks_span_hosts():
    bridge = dict(interface="virbr0", address="192.168.122.1")
    warnings = find_warnings(_report([1.0, 1.0], **bridge), 0.25, 0.5)
    assert len(warnings) == 2  # both ranks named
    assert warnings[0].startswith("rank 0 on a uses interface virbr0 (192.168.122.1, GLOO_SOCKET_IFNAME=eth0), which "
                              "carries no traffic between nodes; set GLOO_SOCKET_IFNAME")
    assert find_warnings(_report([1.0, 1.0], hosts=("a",), interface="lo", address="127.0.0.1"), 0.25, 0.5) == []


def test_the_budget_bounds_the_repeats_of_every_measurement():
    calls = []
    run = lambda: calls.append(1)  # noqa: E731
    Clock(0.0, None, torch.device("cpu")).timed(run, share=1)
    assert len(calls) == 2  # one untimed run, one timed: nothing is left of the budget
    calls.clear()
    Clock(60.0, None, torch.device("cpu")).timed(run, share=1)
    assert len(calls) == 1 + preflight.MAX_REPEATS
    calls.clear()
    Clock(0.0, None, torch.device("cpu")).timed(run, share=1, warm=True)
    assert len(calls) == 1  # already warm: the first run is the measurement


@pytest.mark.parametrize("override, message", [
    ("trainer.preflight=maybe", "trainer.preflight must be one of ('on', 'off', 'only'), got 'maybe'"),
    ("trainer.preflight_budget_s=0", "trainer.preflight_budget_s must be > 0 (seconds), got 0"),
    ("trainer.preflight_slow_link=2", "trainer.preflight_slow_link must be in [0, 1], got 2"),
    ("trainer.preflight_max_comm_share=0", "trainer.preflight_max_comm_share must be in (0, 1], got 0"),
])
def test_bad_preflight_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(override))
    assert message in str(err.value)


def test_preflight_takes_yamls_booleans_for_on_and_off():
    assert preflight.preflight_mode(True) == "on" and preflight.preflight_mode(False) == "off"
    validate_config(_cfg("trainer.preflight=false"))


def test_one_process_with_only_measures_prints_and_exits_without_training(tmp_path):
    proc = run_train(0, [f"hydra.run.dir={tmp_path / 'run'}", "trainer.preflight=only"], tmp_path / "data")
    assert "preflight: 1 rank(s) on 1 host(s)" in proc.stderr
    assert "one process: no process group" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["preflight.json"]  # nothing trained


def test_two_agents_with_only_print_each_ranks_interface_and_link_then_exit_0(tmp_path):
    results = run_nodes(tmp_path, [node_overrides(tmp_path, n, "trainer.preflight=only") for n in (0, 1)])
    assert_all_ok(results)
    out = "".join(o for _, o in results)
    table = out.split("preflight: 2 rank(s) on 1 host(s), gloo")[1].splitlines()
    assert table[1].split()[:4] == ["rank", "host", "interface", "address"] and "link GB/s" in table[1]
    for rank in (0, 1):
        assert table[2 + rank].split()[0] == str(rank) and " lo " in table[2 + rank], table
    assert any(line.startswith("embeddings ") for line in table)
    assert any(line.startswith("predicted communication ") for line in table)
    report = json.loads((node_dir(tmp_path, 0) / "preflight.json").read_text())
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(r["link_gbps"] > 0 and r["interface"] == "lo" for r in report["ranks"])
    assert report["elapsed_s"] > 0 and report["comm_s"] > 0
    for n in (0, 1):  # no checkpoint, no metrics: nothing trained
        assert not (node_dir(tmp_path, n) / "checkpoints").exists()
        assert not (node_dir(tmp_path, n) / "metrics.jsonl").exists()
