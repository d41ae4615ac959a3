"""The interface and address each backend uses, and the check at init: a missing interface or an
address the other node cannot reach ends every rank within seconds, with one line and rc 2."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from partial_fc.train import network
from partial_fc.train.network import Endpoint, Interface, NetworkInterfaceError

from tests.helpers.dist_harness import free_port
from tests.helpers.e2e import REPO, TINY_DATA, train_command

# A GPU node as `ip addr` shows it: libvirt's bridge before the cluster network, as in the report
# of two nodes training 36 times slower than one (NCCL had picked virbr0).
NODE = [Interface("lo", ("127.0.0.1", "::1"), True), Interface("virbr0", ("192.168.122.1",), True),
        Interface("docker0", ("172.17.0.1",), True), Interface("eth0", ("10.0.0.5", "fd00::5"), True),
        Interface("ib0", ("10.1.0.5",), True), Interface("eth1", (), True), Interface("eth2", ("10.2.0.5",), False)]


def test_nccl_socket_ifname_prefixes_exclusions_and_exact_names_select_as_nccl_documents():
    names = lambda spec: [i.name for i in network.nccl_matches(spec, NODE)]  # noqa: E731
    assert names("eth") == ["eth0", "eth2"]  # prefixes; eth1 has no address
    assert names("^docker,lo") == ["virbr0", "eth0", "ib0", "eth2"]
    assert names("=eth") == []  # exact names only
    assert names("=eth0,ib0") == ["eth0", "ib0"]
    assert names("^=eth0") == ["lo", "virbr0", "docker0", "ib0", "eth2"]


def test_nccl_prefers_infiniband_then_whatever_comes_first_but_lo_and_docker():
    assert network.nccl_endpoint(NODE, {}, "n1") == Endpoint("ib0", "10.1.0.5", "NCCL's default order (ib)")
    no_ib = [i for i in NODE if i.name != "ib0"]
    picked = network.nccl_endpoint(no_ib, {}, "n1")
    assert picked == Endpoint("virbr0", "192.168.122.1", "NCCL's default order (^docker,lo)")
    assert network.is_host_local(picked)  # the preflight warns about it on a multi-node job
    assert network.nccl_endpoint(no_ib, {"NCCL_SOCKET_IFNAME": "eth0"}, "n1") == Endpoint(
        "eth0", "10.0.0.5", "NCCL_SOCKET_IFNAME=eth0")
    lo_only = [NODE[0]]
    assert network.nccl_endpoint(lo_only, {}, "n1").interface == "lo"


def test_an_nccl_socket_ifname_that_selects_nothing_names_itself_and_the_interfaces():
    with pytest.raises(NetworkInterfaceError) as err:
        network.nccl_endpoint(NODE, {"NCCL_SOCKET_IFNAME": "eth2"}, "n1")  # down
    assert str(err.value).startswith("NCCL_SOCKET_IFNAME=eth2: no interface of host n1 that is up and has an "
                                     "address matches; available: lo 127.0.0.1 ::1, virbr0 192.168.122.1, ")
    assert "eth1 (no address), eth2 10.2.0.5 (down)" in str(err.value)


@pytest.mark.parametrize("spec, problem", [
    ("nosuchif0", "host n1 has no network interface 'nosuchif0'"),
    ("eth1", "interface eth1 of host n1 has no IPv4 or IPv6 address"),
    ("eth0,eth2", "interface eth2 of host n1 is down"),
])
def test_a_gloo_socket_ifname_entry_gloo_cannot_use_names_itself_and_the_interfaces(spec, problem):
    with pytest.raises(NetworkInterfaceError) as err:
        network.gloo_endpoint(NODE, {"GLOO_SOCKET_IFNAME": spec}, "n1")
    assert str(err.value) == (f"GLOO_SOCKET_IFNAME={spec}: {problem}; available: "
                              f"{network.describe_interfaces(NODE)}")


def test_gloo_takes_the_first_named_interfaces_ipv4_address():
    assert network.gloo_endpoint(NODE, {"GLOO_SOCKET_IFNAME": "eth0,ib0"}, "n1") == Endpoint(
        "eth0", "10.0.0.5", "GLOO_SOCKET_IFNAME=eth0,ib0")


def test_without_gloo_socket_ifname_gloo_binds_the_host_names_address_else_loopback():
    here = network.host_interfaces()
    resolved = network.gloo_endpoint(here, {}, "localhost")
    assert resolved.source == "host name localhost"
    assert network.is_host_local(resolved) and resolved.interface == "lo"
    fallback = network.gloo_endpoint(here, {}, "no-such-host.invalid")
    assert fallback == Endpoint("lo", "127.0.0.1",
                                "loopback: the host name no-such-host.invalid resolves to no local address")


def test_interfaces_are_described_with_their_addresses_and_state():
    assert network.describe_interfaces(NODE[4:]) == "ib0 10.1.0.5, eth1 (no address), eth2 10.2.0.5 (down)"
    assert network.describe_interfaces([]) == "none"
    assert "lo" in [i.name for i in network.host_interfaces()]


def test_each_rank_probes_the_same_local_rank_of_the_next_node():
    two_by_two = ["a", "a", "b", "b"]
    assert [network.probe_target(r, two_by_two, 2) for r in range(4)] == [2, 3, 0, 1]
    three_nodes = ["a", "a", "b", "b", "c", "c"]
    assert [network.probe_target(r, three_nodes, 2) for r in range(6)] == [2, 3, 4, 5, 0, 1]
    assert [network.probe_target(r, ["a", "a"], 2) for r in range(2)] == [None, None]  # one node


# ---------------------------------------------------------------------------------------------- init
def _env(cache, **extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PFC_DATA_CACHE=str(cache), PYTHONUNBUFFERED="1", **extra)


def test_a_missing_interface_under_torchrun_fails_in_seconds_with_one_line_and_status_2(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(train_command(2, [*TINY_DATA, f"hydra.run.dir={tmp_path / 'run'}"]), cwd=REPO,
                          env=_env(tmp_path, GLOO_SOCKET_IFNAME="nosuchif0"), capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - start < 60
    out = proc.stdout + proc.stderr
    host = socket.gethostname()
    line = f"train.py: error: GLOO_SOCKET_IFNAME=nosuchif0: host {host} has no network interface 'nosuchif0'; " \
           f"available: "
    assert line in out and "lo 127.0.0.1" in out.split(line)[1].splitlines()[0], out[-3000:]
    # torchrun exits 1 whenever a worker fails; the worker that failed first exited 2
    assert proc.returncode == 1 and "exitcode  : 2" in out.split("Root Cause")[1], out[-3000:]
    assert str(REPO / "partial_fc") not in out, out[-3000:]  # no traceback from the workers (torchrun has its own)


def test_without_torchrun_every_rank_exits_2_naming_the_rank_whose_interface_is_missing(tmp_path):
    """As under ``srun`` without torchrun: only rank 1's node sets the wrong interface."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        extra = {"GLOO_SOCKET_IFNAME": "nosuchif0"} if rank == 1 else {}
        env = _env(tmp_path, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **extra)
        procs.append(subprocess.Popen(train_command(0, [*TINY_DATA, f"hydra.run.dir={tmp_path / f'run{rank}'}",
                                                        "trainer.init_timeout_s=60"]),
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    problem = f"GLOO_SOCKET_IFNAME=nosuchif0: host {socket.gethostname()} has no network interface 'nosuchif0'"
    assert procs[1].returncode == 2 and f"train.py: error: {problem}" in outputs[1], outputs[1][-3000:]
    assert procs[0].returncode == 2, outputs[0][-3000:]
    assert f"train.py: error: rank 1 on {socket.gethostname()}: {problem}" in outputs[0], outputs[0][-3000:]
