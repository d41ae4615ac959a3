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


class InitTimeoutError(RuntimeError):
    """The ranks did not meet within ``trainer.init_timeout_s``; the message names the phase
    (``rendezvous`` or ``process group``), the store address and namespace, and who was awaited."""


def job_namespace(environ: Optional[Mapping[str, str]] = None, job_num: int = 0) -> str:
    """The store namespace of this (re)start of this job, from what every rank shares by construction.

    torchrun: its run id (``--rdzv_id``, ``TORCHELASTIC_RUN_ID``) and restart count; Slurm without
    torchrun: the job id, step id and requeue count; a plain process: nothing (rank 0 hosts a store
    of its own). ``job_num`` is the Hydra multirun job number (several jobs in one torchrun share the
    agent's store). Never a path or a clock: nodes name their run directories differently.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env:
        source = f"torchrun/{env['TORCHELASTIC_RUN_ID']}/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    elif "SLURM_JOB_ID" in env:
        source = (f"slurm/{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
                  f"/restart_{env.get('SLURM_RESTART_COUNT', '0')}")
    else:
        source = "local"
    return f"partial_fc/{source}/job_{int(job_num)}"


def rendezvous_store(env: DistEnv, timeout: timedelta, namespace: str,
                     environ: Optional[Mapping[str, str]] = None):
    """The key-value store the ranks meet in, with keys private to ``namespace`` (:func:`job_namespace`).

    Under torchrun the agent hosts the store and keeps it across restarts (``--max-restarts``)
    and across the jobs of a Hydra multirun in one torchrun; without a prefix per attempt and per
    job, a new gloo group reads an earlier group's peer addresses and fails to connect or hangs
    (seen with torch 2.13). Elsewhere rank 0 hosts the store. Raises :class:`InitTimeoutError`
    when the store cannot be reached (or, on rank 0, not every rank connects) within ``timeout``.
    """
    environ = os.environ if environ is None else environ
    agent_hosts_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    is_master = not agent_hosts_store and env.rank == 0
    try:
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                              is_master=is_master, timeout=timeout)
    except (RuntimeError, TimeoutError) as err:  # DistStoreError is a RuntimeError
        if is_master:
            waited = f"waited for the other {env.world_size - 1} ranks to connect to the store it hosts"
        else:
            host = "the torchrun agent" if agent_hosts_store else "rank 0"
            waited = f"could not reach the store of {host}"
        raise InitTimeoutError(
            f"rendezvous {namespace!r} at {env.master_addr}:{env.master_port}: rank {env.rank}/"
            f"{env.world_size} {waited} within {timeout.total_seconds():g}s (a node never arrived, or "
            f"MASTER_ADDR/MASTER_PORT differ between nodes; trainer.init_timeout_s sets the limit). "
            f"Original error: {str(err).splitlines()[0][:300]}") from err
    return dist.PrefixStore(namespace, store)


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float, namespace: str,
                     init_timeout_s: Optional[float] = None) -> None:
    """Create the default process group (nccl on CUDA, gloo on CPU) with a collective timeout
    ``timeout_s``; meeting the other ranks (store and group creation) is bounded by
    ``init_timeout_s`` (default ``timeout_s``) and raises :class:`InitTimeoutError` past it.
    ``namespace`` (:func:`job_namespace`) keeps the store keys of different jobs in one launcher apart."""
    if not env.distributed or dist.is_initialized():
        return
    init_timeout = timedelta(seconds=float(init_timeout_s if init_timeout_s is not None else timeout_s))
    store = rendezvous_store(env, init_timeout, namespace)
    backend = "nccl" if device.type == "cuda" else "gloo"
    check_interfaces(store, env, backend, init_timeout, namespace)
    kwargs = dict(
        backend=backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=init_timeout,  # gloo waits this long for the peers' addresses
    )
    if device.type == "cuda":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, TimeoutError) as err:
        if "timeout" not in str(err).lower() and "timed out" not in str(err).lower():
            raise
        raise addresses_timeout(env, backend, init_timeout, namespace, err) from err
    # From here on the collective timeout applies, to the group and to later store use (new
    # groups); torch has no public setter for an existing group's timeout.
    timeout = timedelta(seconds=float(timeout_s))
    dist.distributed_c10d._set_pg_timeout(timeout)
    store.set_timeout(timeout)


def check_interfaces(store, env: DistEnv, backend: str, timeout: timedelta, namespace: str) -> None:
    """Every rank's network interface exists and other nodes reach its address
    (:func:`.network.check_network`), before the process group would hang on it; raises
    :class:`.network.NetworkInterfaceError` on every rank, or :class:`InitTimeoutError` when a
    rank never gets there."""
    from .network import check_network

    try:
        check_network(store, env.rank, env.world_size, env.local_world_size, backend, timeout.total_seconds())
    except dist.DistStoreError as err:
        raise addresses_timeout(env, backend, timeout, namespace, err) from err


def addresses_timeout(env: DistEnv, backend: str, timeout: timedelta, namespace: str,
                      err: BaseException) -> InitTimeoutError:
    """The error of a rank that waited ``timeout`` for the other ranks' addresses (the network
    check's or the process group's own exchange)."""
    return InitTimeoutError(
        f"process group: rank {env.rank}/{env.world_size} waited {timeout.total_seconds():g}s "
        f"in rendezvous {namespace!r} at {env.master_addr}:{env.master_port} for the other ranks' "
        f"{backend} addresses (a rank died or started with another namespace: rdzv id, "
        f"restart count or multirun job; trainer.init_timeout_s sets the limit). "
        f"Original error: {str(err).splitlines()[0][:300]}")


def select_device(requested: str, env: DistEnv) -> torch.device:
    """``cuda`` (this rank's local GPU), ``cpu``, or ``auto``; errors clearly when CUDA is absent
    or this node runs more ranks than it has visible GPUs."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer=cpu")
        device = torch.device("cuda", local_gpu(env, torch.cuda.device_count(),
                                                os.environ.get("CUDA_VISIBLE_DEVICES")))
        torch.cuda.set_device(device)
        return device
    if requested != "cpu":
        raise ValueError(f"trainer.device must be cpu, cuda or auto, got {requested!r}")
    return torch.device("cpu")


def local_gpu(env: DistEnv, visible: int, visible_env: Optional[str] = None) -> int:
    """The index of this rank's GPU among the ``visible`` ones: its local rank. Two ranks on one
    GPU would share its memory and NCCL refuses them, so more local ranks than visible GPUs
    raises ConfigError naming both counts (and ``CUDA_VISIBLE_DEVICES``, ``visible_env``).

    Slurm without torchrun, where each task sees one GPU, is the one exception: that is
    ``srun --gpus-per-task=1`` (or ``--gpu-bind``) giving every task its own, as GPU 0."""
    if env.launcher == "slurm" and visible == 1:
        return 0
    if env.local_world_size > visible:
        from .config import ConfigError

        shown = f" (CUDA_VISIBLE_DEVICES={visible_env})" if visible_env is not None else ""
        raise ConfigError(
            f"trainer.device=cuda: {env.local_world_size} ranks on this node (local world size) but "
            f"{visible} visible GPU(s){shown}: start one rank per GPU (torchrun --nproc_per_node="
            f"{visible}, or Slurm --ntasks-per-node={visible})")
    return env.local_rank


def configure_float32_math(device: torch.device, deterministic: bool) -> None:
    """On CUDA, float32 matmuls and convolutions run on TF32 tensor cores (Ampere and later:
    inputs rounded to a 10-bit mantissa, fp32 accumulation; insightface's recipes do the same),
    unless ``deterministic`` asks for exact float32 arithmetic. CPU math is left as it is."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("highest" if deterministic else "high")
    torch.backends.cudnn.allow_tf32 = not deterministic
