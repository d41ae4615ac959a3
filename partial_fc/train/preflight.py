"""The preflight: before the first step, who each rank is, which network interface its process
group uses, and what the step's own collectives cost on that network.

Per rank: host, interface and address (:mod:`.network`), device and driver, torch and NCCL
versions, and the bandwidth and latency of its link (a simultaneous exchange with the rank half
the world away, on another node when nodes hold contiguous ranks). Per collective of a training
step (:func:`step_collectives`, sizes from the config and the model): the time of one run at its
own size, as the slowest rank saw it, and its bus bandwidth (nccl-tests' definition, see
:func:`bus_factor`). Their sum over a step is the predicted communication time, set against the
backbone's measured forward and backward. Rank 0 prints one table and the warnings: a node whose
interface carries no traffic between nodes, a rank whose link is far slower than the median, a
communication time above a share of the step. Everything is bounded by a time budget.
"""
from __future__ import annotations

import logging
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..classifier.traffic import Collective
from . import network

log = logging.getLogger(__name__)

MODES = ("on", "off", "only")  # trainer.preflight: measure then train, skip, measure and exit
# DDP's buckets (torch.nn.parallel.DistributedDataParallel defaults): a first bucket of 1 MiB, then
# bucket_cap_mb=25.
DDP_FIRST_BUCKET_BYTES = 2**20
DDP_BUCKET_BYTES = 25 * 2**20
LINK_TEST_BYTES = (4 * 2**20, 64 * 2**20)  # the link exchange: the largest step message, within these
MAX_REPEATS = 10  # timed runs of one collective at most
COMPUTE_REPEATS = 3  # timed forward-backward runs of the backbone at most
IMAGE_SHAPE = (3, 112, 112)  # what every backbone takes (partial_fc.models)


def preflight_mode(value) -> str:
    """``trainer.preflight`` as one of :data:`MODES` (YAML's unquoted ``on``/``off`` and the
    command line's ``true``/``false`` are booleans); raises ValueError otherwise."""
    mode = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if mode not in MODES:
        raise ValueError(f"must be one of {MODES}")
    return mode


def ddp_bucket_bytes(total: int) -> List[int]:
    """DDP's gradient buckets for ``total`` bytes of gradients: 1 MiB, then 25 MiB ones (DDP closes
    a bucket at a parameter boundary, so real sizes differ a little; their sum is exact)."""
    sizes = [min(total, DDP_FIRST_BUCKET_BYTES)]
    rest = total - sizes[0]
    while rest > 0:
        sizes.append(min(rest, DDP_BUCKET_BYTES))
        rest -= sizes[-1]
    return [s for s in sizes if s > 0]


def step_collectives(classifier: Sequence[Collective], gradient_bytes: int,
                     grad_accum: int) -> List[Collective]:
    """The collectives of one optimizer step, in the order the step runs them: ``classifier``'s
    (:func:`partial_fc.classifier.traffic.step_collectives`, one forward and backward) in each
    of the ``grad_accum`` micro-batches; once per step the backbone's ``gradient_bytes`` of fp32
    gradients in DDP buckets, the gradient norm with the stop vote, and the non-finite check.
    ``count`` says how many times per optimizer step."""
    steps = [replace(c, count=c.count * grad_accum) for c in classifier]
    runs: List[list] = []  # [bucket size, how many in a row]
    for size in ddp_bucket_bytes(gradient_bytes):
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    steps += [Collective("backbone gradients (DDP buckets)", "all_reduce", (size // 4,), torch.float32, count)
              for size, count in runs]
    steps.append(Collective("gradient norm, stop vote", "all_reduce", (2,), torch.float32, 1))
    steps.append(Collective("non-finite check", "all_reduce", (1,), torch.float32, 1))
    return steps


def bus_factor(op: str, world_size: int) -> float:
    """Bus bandwidth over algorithm bandwidth (bytes per rank / time), as nccl-tests defines it
    (doc/PERFORMANCE.md): all-reduce ``2(n-1)/n``; all-gather ``n-1`` (the rank's part);
    reduce-scatter ``(n-1)/n`` (the whole input)."""
    n = world_size
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": n - 1, "reduce_scatter": (n - 1) / n}[op]


# ----------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runner(c: Collective, group, device: torch.device) -> Callable[[], None]:
    x = torch.zeros(c.shape, dtype=c.dtype, device=device)
    if c.op == "all_gather":
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        return lambda: dist.all_gather(parts, x, group=group)
    if c.op == "reduce_scatter":
        out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
        return lambda: dist.reduce_scatter_tensor(out, x, group=group)
    return lambda: dist.all_reduce(x, group=group)


class Clock:
    """The preflight's time budget: each measurement gets an even share of what is left, and
    every rank runs the same number of repeats (a collective decides it)."""

    def __init__(self, budget_s: float, group, device: torch.device):
        self.start, self.budget_s, self.group, self.device = time.perf_counter(), budget_s, group, device

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def timed(self, run: Callable[[], None], share: int, warm: bool = False,
              max_repeats: int = MAX_REPEATS) -> float:
        """Seconds one ``run()`` takes: a first run (untimed unless ``warm``: run before), then
        as many timed ones (up to ``max_repeats`` in all, at least one) as ``1/share`` of the
        remaining budget allows; their mean."""
        first = self._once(run)
        agreed = torch.tensor([first], dtype=torch.float64, device=self.device)
        if self.group is not None:
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
        times = [first] if warm else []
        allowance = max(0.0, self.budget_s - self.elapsed) / max(1, share)
        repeats = int(min(max_repeats, allowance // max(float(agreed), 1e-6))) - len(times)
        times += [self._once(run) for _ in range(max(repeats, 0 if times else 1))]
        return sum(times) / len(times)

    def _once(self, run: Callable[[], None]) -> float:
        """One run, started together on every rank (a barrier outside the timing)."""
        if self.group is not None:
            dist.barrier(group=self.group)
        _sync(self.device)
        start = time.perf_counter()
        run()
        _sync(self.device)
        return time.perf_counter() - start


def backbone_step(backbone: nn.Module, batch: int, device: torch.device, autocast_dtype: Optional[torch.dtype],
                  channels_last: bool):
    """A forward and backward of ``backbone`` on a random batch (as a step runs it); returns the
    callable and the embeddings' dtype."""
    images = torch.randn(batch, *IMAGE_SHAPE, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    seen = {}

    def run():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            embeddings = backbone(images)
        seen["dtype"] = embeddings.dtype
        embeddings.float().sum().backward()

    run()
    return run, seen["dtype"]


def link_exchange(group, rank: int, world_size: int, nbytes: int, device: torch.device) -> Callable[[], None]:
    """Send ``nbytes`` to the rank ``world_size // 2`` ahead while receiving as much from the one
    as far behind; every rank at once."""
    out = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    into = torch.empty_like(out)
    shift = max(1, world_size // 2)
    dest = dist.get_global_rank(group, (rank + shift) % world_size)
    src = dist.get_global_rank(group, (rank - shift) % world_size)

    def run():
        works = [dist.isend(out, dest, group=group), dist.irecv(into, src, group=group)]
        for work in works:
            work.wait()

    return run


def versions(device: torch.device) -> Dict[str, str]:
    """Device name, driver, torch and NCCL versions of this process."""
    info = {"device": "cpu", "driver": "-", "torch": torch.__version__, "nccl": "-"}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        try:  # the kernel module's version line: "NVRM version: NVIDIA UNIX ... Kernel Module  550.54.15 ..."
            with open("/proc/driver/nvidia/version") as f:
                words = f.readline().split()
            info["driver"] = words[words.index("Module") + 1] if "Module" in words else "?"
        except OSError:
            info["driver"] = "?"
    return info


# ----------------------------------------------------------------------------- the report
@dataclass
class Report:
    """What the preflight found; ``ranks`` in rank order, times in seconds, sizes in bytes."""

    backend: str
    world_size: int
    ranks: List[Dict]
    collectives: List[Dict]
    compute_s: float
    comm_s: float
    link_bytes: int
    budget_s: float
    elapsed_s: float = 0.0
    warnings: List[str] = field(default_factory=list)

    @property
    def comm_share(self) -> float:
        return self.comm_s / max(self.comm_s + self.compute_s, 1e-12)

    def to_dict(self) -> Dict:
        return {**asdict(self), "comm_share": self.comm_share}


def find_warnings(report: Report, slow_link: float, max_comm_share: float) -> List[str]:
    """The problems ``report`` shows: on more than one host, a rank whose interface carries no
    traffic between hosts; a rank whose link delivers under ``slow_link`` times the median rank's
    bandwidth; a predicted communication time above ``max_comm_share`` of the step."""
    found = []
    if len({r["host"] for r in report.ranks}) > 1:
        for r in report.ranks:
            if network.is_host_local(network.Endpoint(r["interface"], r["address"], r["source"])):
                found.append(f"rank {r['rank']} on {r['host']} uses interface {r['interface']} ({r['address']}, "
                             f"{r['source']}), which carries no traffic between nodes; set "
                             f"{network.ifname_variable(report.backend)} to the cluster network's interface "
                             f"(on {r['host']}: {r['interfaces']})")
    links = [r["link_gbps"] for r in report.ranks if r.get("link_gbps") is not None]
    if len(links) > 1:
        median = statistics.median(links)
        for r in report.ranks:
            if r.get("link_gbps") is not None and r["link_gbps"] < slow_link * median:
                found.append(f"rank {r['rank']} on {r['host']} ({r['interface']}) moves {r['link_gbps']:.3g} GB/s, "
                             f"under {slow_link:g} x the median rank's {median:.3g} GB/s "
                             f"(trainer.preflight_slow_link): its link slows every step")
    if report.world_size > 1 and report.comm_share > max_comm_share:
        found.append(f"the step's collectives are predicted to take {1e3 * report.comm_s:.3g} ms per step, "
                     f"{100 * report.comm_share:.0f}% of a step with the backbone's {1e3 * report.compute_s:.3g} ms "
                     f"(above trainer.preflight_max_comm_share={max_comm_share:g}): check the interfaces and "
                     f"link speeds above, or raise data.batch_size")
    return found


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]


def format_report(report: Report) -> str:
    """The table rank 0 prints: one line per rank, one per collective, the prediction."""
    ranks = [(r["rank"], r["host"], r["interface"], r["address"], r["source"], r["device"], r["driver"],
              r["torch"], r["nccl"], _number(r.get("link_gbps")), _number(r.get("latency_ms")))
             for r in report.ranks]
    lines = [f"preflight: {report.world_size} rank(s) on {len({r['host'] for r in report.ranks})} host(s), "
             f"{report.backend}, {report.elapsed_s:.2f} s of a {report.budget_s:g} s budget",
             *_table(("rank", "host", "interface", "address", "chosen by", "device", "driver", "torch", "nccl",
                      f"link GB/s ({_size(report.link_bytes)})", "latency ms"), ranks)]
    if report.collectives:
        rows = [(c["name"], c["op"], _size(c["bytes"]), c["count"], f"{1e3 * c['seconds']:.3f}",
                 _number(c["bus_gbps"])) for c in report.collectives]
        lines += _table(("collective", "op", "bytes/rank", "per step", "ms", "bus GB/s"), rows)
    lines.append(f"predicted communication {1e3 * report.comm_s:.3g} ms per step; backbone forward and backward "
                 f"{1e3 * report.compute_s:.3g} ms; communication {100 * report.comm_share:.0f}% of the step "
                 f"(not overlapped, the classifier's compute left out)")
    return "\n".join(lines)


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _size(nbytes: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


# ----------------------------------------------------------------------------- the run
@dataclass
class Preflight:
    """Plain arguments of a preflight (``builders.build_preflight`` makes one from the config).

    ``build_backbone``: a fresh backbone of the run's architecture on ``device``;
    ``collectives(gradient_bytes)``: the step's :func:`step_collectives`."""

    build_backbone: Callable[[], nn.Module]
    collectives: Callable[[int], List[Collective]]
    local_batch: int
    grad_accum: int
    autocast_dtype: Optional[torch.dtype]
    channels_last: bool
    device: torch.device
    group: object
    rank: int
    world_size: int
    budget_s: float
    slow_link: float
    max_comm_share: float

    @property
    def backend(self) -> str:
        if self.group is None:
            return "none"
        return str(dist.get_backend(self.group))

    def run(self) -> Report:
        """Collective over ``group``: measure, gather to every rank, return the report."""
        clock = Clock(self.budget_s, self.group if self.world_size > 1 else None, self.device)
        backbone = self.build_backbone()
        step, _ = backbone_step(backbone, self.local_batch, self.device, self.autocast_dtype,
                                self.channels_last)
        compute = self.grad_accum * clock.timed(step, share=4, warm=True, max_repeats=COMPUTE_REPEATS)
        gradient_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters() if p.requires_grad)
        del backbone, step
        mine = {"rank": self.rank, "host": socket.gethostname(), **versions(self.device), "compute_s": compute}
        collectives = self.collectives(gradient_bytes) if self.world_size > 1 else []
        link_bytes = min(max([c.nbytes for c in collectives] + [LINK_TEST_BYTES[0]]), LINK_TEST_BYTES[1])
        if self.world_size > 1:
            mine.update(self._endpoint(), **self._link(clock, link_bytes, len(collectives)))
            times = [clock.timed(_runner(c, self.group, self.device), share=len(collectives) - i)
                     for i, c in enumerate(collectives)]
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, {**mine, "times": times}, group=self.group)
        else:
            ranks = [{**mine, "interface": "-", "address": "-", "source": "one process: no process group",
                      "interfaces": "-", "times": []}]
        return self._report(ranks, collectives, link_bytes, clock.elapsed)

    def _endpoint(self) -> Dict:
        interfaces = network.host_interfaces()
        endpoint = network.backend_endpoint(self.backend, interfaces=interfaces)
        return {**asdict(endpoint), "interfaces": network.describe_interfaces(interfaces)}

    def _link(self, clock: Clock, nbytes: int, pending: int) -> Dict:
        big = clock.timed(link_exchange(self.group, self.rank, self.world_size, nbytes, self.device),
                          share=pending + 2)
        small = clock.timed(link_exchange(self.group, self.rank, self.world_size, 4, self.device),
                            share=pending + 1)
        return {"link_gbps": nbytes / big / 1e9, "latency_ms": 1e3 * small}

    def _report(self, ranks: List[Dict], collectives: List[Collective], link_bytes: int, elapsed: float) -> Report:
        rows = []
        for i, c in enumerate(collectives):
            seconds = max(r["times"][i] for r in ranks)  # the step waits for the slowest rank
            rows.append({"name": c.name, "op": c.op, "bytes": c.nbytes, "count": c.count, "seconds": seconds,
                         "bus_gbps": c.nbytes * bus_factor(c.op, self.world_size) / seconds / 1e9})
        report = Report(
            backend=self.backend, world_size=self.world_size,
            ranks=[{k: v for k, v in r.items() if k != "times"} for r in ranks], collectives=rows,
            compute_s=max(r["compute_s"] for r in ranks),
            comm_s=sum(c["seconds"] * c["count"] for c in rows), link_bytes=link_bytes,
            budget_s=self.budget_s, elapsed_s=elapsed)
        report.warnings = find_warnings(report, self.slow_link, self.max_comm_share)
        return report
