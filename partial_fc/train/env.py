"""Where this process sits in the job: torchrun, Slurm without torchrun, or a plain process."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of the job and how it was launched."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | slurm | none

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as ``gpu[001-004,007],cpu1`` -> ``gpu001``."""
    nodelist = nodelist.strip()
    match = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_port(job_id: int) -> int:
    """The port the ranks of Slurm job ``job_id`` meet on when ``MASTER_PORT`` is unset:
    ``20000 + job_id % 10000``, as in launch/slurm/train.sbatch. Distinct for jobs sharing a node
    (up to 10000 apart) and below Linux's ephemeral range (``ip_local_port_range``, 32768-60999),
    where an outgoing connection could already hold it."""
    return 20000 + int(job_id) % 10000


def detect_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the rank layout from torchrun's (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or Slurm's
    (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``) variables; a plain process otherwise."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        ntasks = int(env["SLURM_NTASKS"])
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world = int(per_node) if per_node.isdigit() else max(1, ntasks // int(env.get("SLURM_NNODES", 1)))
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodes),
            master_port=int(env.get("MASTER_PORT") or slurm_port(job_id)),
            launcher="slurm",
        )
    return DistEnv()


def rendezvous_store(env: DistEnv, timeout: timedelta, namespace: str = "",
                     environ: Optional[Mapping[str, str]] = None):
    """The key-value store the ranks meet in, with keys private to this (re)start of this job.

    Under torchrun the agent hosts the store and keeps it across restarts (``--max-restarts``)
    and across the jobs of a Hydra multirun in one torchrun; without a prefix per attempt and per
    job (``namespace``, e.g. the run directory), a new gloo group reads an earlier group's peer
    addresses and fails to connect or hangs (seen with torch 2.13). Elsewhere rank 0 hosts the store.
    """
    environ = os.environ if environ is None else environ
    agent_hosts_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=not agent_hosts_store and env.rank == 0, timeout=timeout)
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"partial_fc/{namespace}/attempt_{attempt}", store)


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float, namespace: str = "") -> None:
    """Create the default process group (nccl on CUDA, gloo on CPU) with a collective timeout;
    ``namespace`` keeps the store keys of different jobs in one launcher apart."""
    if not env.distributed or dist.is_initialized():
        return
    timeout = timedelta(seconds=float(timeout_s))
    kwargs = dict(
        backend="nccl" if device.type == "cuda" else "gloo",
        store=rendezvous_store(env, timeout, namespace),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def select_device(requested: str, env: DistEnv) -> torch.device:
    """``cuda`` (this rank's local GPU), ``cpu``, or ``auto``; errors clearly when CUDA is absent."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer=cpu")
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if requested != "cpu":
        raise ValueError(f"trainer.device must be cpu, cuda or auto, got {requested!r}")
    return torch.device("cpu")
