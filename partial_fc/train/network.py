"""Which network interface and address a rank's process group uses, and the check at init that
the other nodes can reach it.

Both backends pick an address the same way on every run, so it can be worked out before the
group forms:

- Gloo (torch's ``ProcessGroupGloo``, ``GlooDeviceFactory``): every interface named in
  ``GLOO_SOCKET_IFNAME`` (comma-separated; its first IPv4 address, else its first IPv6 one);
  unset: the first address this host's name resolves to that can be bound, else the loopback
  address ``127.0.0.1``.
- NCCL (``NCCL_SOCKET_IFNAME`` in NCCL's environment-variable documentation): a comma-separated
  list of interface-name prefixes, ``^`` in front excludes them, ``=`` makes them exact names;
  unset: interfaces named ``ib*``, else any but ``lo`` and ``docker*``, else ``docker*``, else
  ``lo``. This is the interface of NCCL's bootstrap and socket transport (InfiniBand traffic uses
  the adapters of ``NCCL_IB_HCA``).

:func:`check_network` runs once per (re)start, over the rendezvous store, before the process
group: a named interface that does not exist (or is down, or has no address) and an address that
a rank of another node cannot connect to end every rank with one :class:`NetworkInterfaceError`
naming the interface, the address and the interfaces the host has.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import asdict, dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

GLOO_LOOPBACK = "127.0.0.1"  # Gloo's fallback when the host name resolves to nothing bindable
NCCL_DEFAULT_ORDER = ("ib", "^docker,lo", "docker", "lo")  # NCCL's own order without NCCL_SOCKET_IFNAME
# Interfaces that carry no traffic between nodes: loopback, and bridges private to one host
# (Docker, libvirt, LXC/LXD, Podman, VirtualBox, VMware host-only networks).
HOST_LOCAL_PREFIXES = ("lo", "docker", "virbr", "br-", "lxcbr", "lxdbr", "podman", "cni-podman", "vboxnet",
                       "vmnet")
PROBE_TIMEOUT_S = 10.0  # bound on one connection attempt of the reachability probe


class NetworkInterfaceError(RuntimeError):
    """The process group's network interface is missing or unusable, or other nodes cannot reach
    its address; the message names the interface, the address and the interfaces available."""


@dataclass(frozen=True)
class Interface:
    """A network interface of this host: ``addresses`` IPv4 first, then IPv6 (no link-local)."""

    name: str
    addresses: Tuple[str, ...]
    up: bool


@dataclass(frozen=True)
class Endpoint:
    """The interface and address a backend binds to, and ``source``: what chose them."""

    interface: str
    address: str
    source: str


def host_interfaces() -> List[Interface]:
    """This host's interfaces in the kernel's order (``getifaddrs``, through psutil)."""
    import psutil

    stats = psutil.net_if_stats()
    found = []
    for name, entries in psutil.net_if_addrs().items():
        v4 = [e.address for e in entries if e.family == socket.AF_INET]
        v6 = [e.address for e in entries if e.family == socket.AF_INET6
              and not ipaddress.ip_address(e.address.split("%")[0]).is_link_local]
        found.append(Interface(name, tuple(v4 + v6), bool(stats[name].isup) if name in stats else False))
    return found


def describe_interfaces(interfaces: Sequence[Interface]) -> str:
    """``lo 127.0.0.1, eth0 10.0.0.2 fd00::2, ifb0 (down, no address)``."""
    parts = []
    for iface in interfaces:
        notes = [] if iface.up else ["down"]
        if not iface.addresses:
            notes.append("no address")
        parts.append(" ".join([iface.name, *iface.addresses]) + (f" ({', '.join(notes)})" if notes else ""))
    return ", ".join(parts) or "none"


def is_host_local(endpoint: Endpoint) -> bool:
    """Whether ``endpoint`` can only carry traffic within its host (loopback, a local bridge)."""
    address = ipaddress.ip_address(endpoint.address.split("%")[0])
    return address.is_loopback or endpoint.interface.startswith(HOST_LOCAL_PREFIXES)


def interface_of(address: str, interfaces: Sequence[Interface]) -> str:
    """The name of the interface holding ``address`` (``?`` when none does)."""
    for iface in interfaces:
        if address in iface.addresses:
            return iface.name
    return "lo" if ipaddress.ip_address(address.split("%")[0]).is_loopback else "?"


def _unusable(iface: Optional[Interface], name: str, what: str, host: str,
              interfaces: Sequence[Interface]) -> Optional[str]:
    if iface is None:
        problem = f"host {host} has no network interface {name!r}"
    elif not iface.up:
        problem = f"interface {name} of host {host} is down"
    elif not iface.addresses:
        problem = f"interface {name} of host {host} has no IPv4 or IPv6 address"
    else:
        return None
    return f"{what}: {problem}; available: {describe_interfaces(interfaces)}"


def _bindable(address: str, family: int) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


def gloo_endpoint(interfaces: Sequence[Interface], environ: Mapping[str, str], hostname: str) -> Endpoint:
    """Where Gloo binds (the module docstring says how it picks); raises
    :class:`NetworkInterfaceError` for a ``GLOO_SOCKET_IFNAME`` entry it could not use."""
    spec = environ.get("GLOO_SOCKET_IFNAME", "")
    if spec:
        by_name = {i.name: i for i in interfaces}
        names = [n for n in spec.split(",") if n]
        for name in names:
            problem = _unusable(by_name.get(name), name, f"GLOO_SOCKET_IFNAME={spec}", hostname, interfaces)
            if problem:
                raise NetworkInterfaceError(problem)
        return Endpoint(names[0], by_name[names[0]].addresses[0], f"GLOO_SOCKET_IFNAME={spec}")
    try:
        resolved = socket.getaddrinfo(hostname, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except OSError:
        resolved = []
    for family, _, _, _, sockaddr in resolved:
        if _bindable(sockaddr[0], family):
            return Endpoint(interface_of(sockaddr[0], interfaces), sockaddr[0], f"host name {hostname}")
    return Endpoint(interface_of(GLOO_LOOPBACK, interfaces), GLOO_LOOPBACK,
                    f"loopback: the host name {hostname} resolves to no local address")


def nccl_matches(spec: str, interfaces: Sequence[Interface]) -> List[Interface]:
    """The interfaces with an address that ``NCCL_SOCKET_IFNAME=spec`` selects, in order."""
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    names = [n for n in (spec[1:] if exact else spec).split(",") if n]

    def named(iface):
        return any(iface.name == n if exact else iface.name.startswith(n) for n in names)

    return [i for i in interfaces if i.addresses and named(i) != exclude]


def nccl_endpoint(interfaces: Sequence[Interface], environ: Mapping[str, str], hostname: str) -> Endpoint:
    """Where NCCL's bootstrap binds (the module docstring says how it picks); raises
    :class:`NetworkInterfaceError` when ``NCCL_SOCKET_IFNAME`` selects no usable interface."""
    spec = environ.get("NCCL_SOCKET_IFNAME", "")
    if spec:
        chosen = [i for i in nccl_matches(spec, interfaces) if i.up]
        if not chosen:
            raise NetworkInterfaceError(
                f"NCCL_SOCKET_IFNAME={spec}: no interface of host {hostname} that is up and has an "
                f"address matches; available: {describe_interfaces(interfaces)}")
        return Endpoint(chosen[0].name, chosen[0].addresses[0], f"NCCL_SOCKET_IFNAME={spec}")
    for rule in NCCL_DEFAULT_ORDER:
        chosen = nccl_matches(rule, interfaces)
        if chosen:
            return Endpoint(chosen[0].name, chosen[0].addresses[0], f"NCCL's default order ({rule})")
    raise NetworkInterfaceError(f"NCCL: host {hostname} has no interface with an address; "
                                f"available: {describe_interfaces(interfaces)}")


def backend_endpoint(backend: str, environ: Optional[Mapping[str, str]] = None,
                     interfaces: Optional[Sequence[Interface]] = None,
                     hostname: Optional[str] = None) -> Endpoint:
    """The endpoint of ``backend`` (``gloo`` or ``nccl``) on this host."""
    environ = os.environ if environ is None else environ
    interfaces = host_interfaces() if interfaces is None else interfaces
    hostname = socket.gethostname() if hostname is None else hostname
    pick = nccl_endpoint if backend == "nccl" else gloo_endpoint
    return pick(interfaces, environ, hostname)


def ifname_variable(backend: str) -> str:
    return "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"


# ----------------------------------------------------------------------------- the check at init
def _gather(store, rank: int, world_size: int, prefix: str, record: dict, timeout_s: float) -> List[dict]:
    from torch.distributed.elastic.utils.store import synchronize

    raw = synchronize(store, json.dumps(record).encode(), rank, world_size, prefix, timeout=timeout_s)
    return [json.loads(r) for r in raw]


def _listen(address: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(64)  # the kernel completes the probes' handshakes; nothing needs to accept
    return sock


def probe_target(rank: int, nodes: Sequence[str], local_world_size: int) -> Optional[int]:
    """The rank whose address ``rank`` probes: the first rank of another node counted from
    ``rank + local_world_size`` (the same local rank on the next node when nodes hold contiguous
    ranks, so each rank is probed by one rank); None on a single node."""
    world_size = len(nodes)
    for k in range(world_size):
        other = (rank + local_world_size + k) % world_size
        if nodes[other] != nodes[rank]:
            return other
    return None


def _probe(record: dict, timeout_s: float) -> Optional[str]:
    try:
        with socket.create_connection((record["address"], record["port"]), timeout=timeout_s):
            return None
    except OSError as err:
        return str(err) or type(err).__name__


def _unreachable_message(prober: dict, target: dict, error: str, backend: str, failures: int) -> str:
    more = f" (and {failures - 1} more rank(s) could not reach theirs)" if failures > 1 else ""
    return (f"rank {prober['rank']} on {prober['host']} cannot reach rank {target['rank']} on "
            f"{target['host']} at {target['address']}:{target['port']}, the address of interface "
            f"{target['interface']} ({target['source']}) that {backend} uses there: {error}{more}. "
            f"Interfaces on {target['host']}: {target['interfaces']}. Set {ifname_variable(backend)} "
            f"on every node to an interface the nodes reach each other through")


def check_network(store, rank: int, world_size: int, local_world_size: int, backend: str,
                  timeout_s: float, environ: Optional[Mapping[str, str]] = None) -> Endpoint:
    """Collective over ``store`` (every rank calls it before the process group forms): resolve
    this rank's :func:`backend_endpoint`, share it, and have each rank connect to the address of
    one rank of another node (:func:`probe_target`). Returns this rank's endpoint; raises
    :class:`NetworkInterfaceError` on every rank when any rank's interface is unusable or a probe
    fails (within ``timeout_s``, each probe within :data:`PROBE_TIMEOUT_S`). The store's own
    timeout bounds the wait for ranks that never arrive (``DistStoreError``)."""
    environ = os.environ if environ is None else environ
    host = socket.gethostname()
    interfaces = host_interfaces()
    node = f"{host}/{environ.get('GROUP_RANK', environ.get('SLURM_NODEID', ''))}"
    record = {"rank": rank, "host": host, "node": node, "interfaces": describe_interfaces(interfaces)}
    listener = None
    try:
        endpoint = backend_endpoint(backend, environ, interfaces, host)
        listener = _listen(endpoint.address)
        record.update(asdict(endpoint), port=listener.getsockname()[1])
    except (NetworkInterfaceError, OSError) as err:
        endpoint = None
        record["error"] = str(err)
    try:
        records = _gather(store, rank, world_size, "pfc_network/endpoint/", record, timeout_s)
        failed = [r for r in records if "error" in r]
        if failed:
            first = record if "error" in record else failed[0]
            raise NetworkInterfaceError(first["error"] if first is record
                                        else f"rank {first['rank']} on {first['host']}: {first['error']}")
        target = probe_target(rank, [r["node"] for r in records], local_world_size)
        error = None if target is None else _probe(records[target], min(PROBE_TIMEOUT_S, timeout_s))
        probes = _gather(store, rank, world_size, "pfc_network/probe/",
                         {"target": target, "error": error}, timeout_s)
    finally:
        if listener is not None:
            listener.close()
    failures = [(p, r) for p, r in enumerate(probes) if r["error"] is not None]
    if failures:
        prober, result = failures[0]
        raise NetworkInterfaceError(_unreachable_message(records[prober], records[result["target"]],
                                                         result["error"], backend, len(failures)))
    return endpoint
