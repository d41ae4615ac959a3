"""Two "hosts" on one machine: node 1 runs in a network namespace of its own (a veth pair to this
one, its own host name through a UTS namespace), so each node has an address of its own and the
loopback of one is not the other's. Needs root and iproute2; the namespace and its veth pair are
removed after each test.

- With the right interfaces (``GLOO_SOCKET_IFNAME`` per node), the preflight with ``only`` shows two
  hosts, each rank's interface and address and its link's GB/s, and both exit 0 without training.
- A node whose host name resolves to nothing makes Gloo fall back to its loopback address, which the
  other node cannot reach: both nodes end in seconds with one line naming the rank, the address,
  the interface, how it was chosen and the interfaces that node has. (Without the check these two
  nodes happen to train: Gloo opens each pair's connection from one side only, and here that side
  was the node with the loopback address. Whether a job starts then depends on the rank order the
  rendezvous draws, on every restart; NCCL's bootstrap needs every address.)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.e2e import TINY_DATA, wait_agents
from tests.helpers.slurm_harness import SLURM_DIR, free_port, launcher_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None,
                                reason="needs root, iproute2's ip and util-linux's unshare (network namespaces)")
COMMON = [*TINY_DATA, "trainer.max_steps=2", "trainer.val_every=0", "data.val_bins=[]", "trainer.progress_bar=false",
          "trainer.threads=1", "trainer.init_timeout_s=60", "trainer.collective_timeout_s=60"]


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def second_host():
    """A network namespace joined to this one by a veth pair: ``(namespace, {node: (interface,
    address)})``; removed afterwards (with the namespace go both ends of the pair)."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    namespace, here, there = f"pfc{tag}", f"pfca{tag}", f"pfcb{tag}"
    try:
        _ip("netns", "add", namespace)
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot create a network namespace: {err.stderr.strip()}")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", namespace)
        _ip("addr", "add", f"{subnet}.1/24", "dev", here)
        _ip("link", "set", here, "up")
        for args in (("addr", "add", f"{subnet}.2/24", "dev", there), ("link", "set", there, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", namespace, "ip", *args)
        yield namespace, {0: (here, f"{subnet}.1"), 1: (there, f"{subnet}.2")}
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def _run_two_hosts(tmp_path: Path, namespace: str, links, overrides, gloo_ifname_on_node1: bool):
    """Node 0 here, node 1 in ``namespace`` as host ``nodeb``; returns [(returncode, output)]."""
    port = free_port()
    rdzv = links[0][1]
    procs, logs = [], []
    for node in (0, 1):
        interface, address = links[node]
        env = launcher_env(dict(PFC_RDZV_HOST=rdzv, PFC_RDZV_PORT=str(port), PFC_RDZV_ID="hosts",
                                PFC_NODE_RANK=str(node), PFC_NNODES="2", PFC_NPROC_PER_NODE="1",
                                PFC_JOIN_TIMEOUT="60", PFC_LOCAL_ADDR=address, OMP_NUM_THREADS="1",
                                PYTHONUNBUFFERED="1", PFC_DATA_CACHE=str(tmp_path / f"data{node}")))
        if node == 0 or gloo_ifname_on_node1:
            env["GLOO_SOCKET_IFNAME"] = interface
        command = ["bash", str(SLURM_DIR / "torchrun_cmd.sh"), *COMMON, f"hydra.run.dir={tmp_path / f'run{node}'}",
                   *overrides]
        if node == 1:
            command = ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c",
                       'hostname nodeb && exec "$@"', "node1", *command]
        logs.append(open(tmp_path / f"node{node}.log", "w+"))
        procs.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return wait_agents(procs, logs, 180)


def test_two_hosts_preflight_shows_each_ranks_interface_address_and_link_then_exits_0(tmp_path, second_host):
    namespace, links = second_host
    results = _run_two_hosts(tmp_path, namespace, links, ["trainer.preflight=only"], gloo_ifname_on_node1=True)
    for node, (code, out) in enumerate(results):
        assert code == 0, f"node {node}: {out[-4000:]}"
    report_dir = next(tmp_path / f"run{n}" for n in (0, 1) if (tmp_path / f"run{n}" / "preflight.json").exists())
    report = json.loads((report_dir / "preflight.json").read_text())
    by_host = {r["host"]: r for r in report["ranks"]}
    assert sorted(by_host) == sorted([os.uname().nodename, "nodeb"])
    assert by_host["nodeb"]["interface"] == links[1][0] and by_host["nodeb"]["address"] == links[1][1]
    here = by_host[os.uname().nodename]
    assert here["interface"] == links[0][0] and here["address"] == links[0][1]
    assert all(r["link_gbps"] > 0 and r["source"].startswith("GLOO_SOCKET_IFNAME=") for r in report["ranks"])
    out = "".join(o for _, o in results)
    assert "preflight: 2 rank(s) on 2 host(s), gloo" in out
    table = out.split("preflight: 2 rank(s) on 2 host(s)")[1].splitlines()[2:4]
    assert sorted(line.split()[2] for line in table) == sorted([links[0][0], links[1][0]])
    assert not report["warnings"] or all("carries no traffic" not in w for w in report["warnings"])
    for node in (0, 1):
        assert not (tmp_path / f"run{node}" / "checkpoints").exists()  # nothing trained


def test_a_host_whose_name_resolves_to_nothing_falls_back_to_loopback_and_fails_both_nodes_naming_it(
        tmp_path, second_host):
    namespace, links = second_host
    start = time.monotonic()
    results = _run_two_hosts(tmp_path, namespace, links, [], gloo_ifname_on_node1=False)
    assert time.monotonic() - start < 60
    for node, (code, out) in enumerate(results):
        assert code != 0 and "exitcode  : 2" in out, f"node {node}: {out[-4000:]}"
        line = next((x for x in out.splitlines() if x.startswith("train.py: error: ")), "")
        assert " cannot reach rank " in line and " on nodeb at 127.0.0.1:" in line, f"node {node}: {out[-4000:]}"
        assert ("the address of interface lo (loopback: the host name nodeb resolves to no local address) that "
                "gloo uses there") in line
        assert f"Interfaces on nodeb: lo 127.0.0.1 ::1, {links[1][0]} {links[1][1]}" in line
        assert "Set GLOO_SOCKET_IFNAME on every node" in line
