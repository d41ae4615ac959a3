"""Step time and peak memory of the classifier head alone: forward, backward and the
SGD-momentum update of one device's class shard, for a synthetic global batch.

    python bench/head.py --device cpu --classes 100000 --batch 1024 --head npcface
    python bench/head.py --build config --head npcface     # through conf/ and builders.py

The classifier is what training builds: ``--build api`` (default) is ``PartialFC(head, D, C)``
with the API's defaults, ``--build config`` is ``partial_fc.train.builders.build_classifier`` on
the composed training config (``head=<head>``); ``--impl``, ``--fused``, ``--sweep``,
``--block-size`` override either. As in training, the classifier runs outside autocast, its
GEMMs in ``--precision`` (bf16 on CUDA by default: ``gemm_dtype``), statistics in fp32.

Every step is preceded by the bare GEMMs of that step's shapes (``gemm_floor_ms``, median; see
:func:`gemm_floor`), so ``floor_ratio`` = ms / gemm_floor_ms compares the step with its
three-GEMM floor measured under the same machine load.

Prints one JSON line: ``ms`` (median step), ``peak_bytes`` (CUDA: max allocated; CPU: the
process's peak RSS, so run one configuration per process), the step's plan (path, sweep,
chunk rows, compiled tiles) and the configuration; on CPU also process CPU times.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import npc_head  # noqa: E402
import partial_fc  # noqa: E402
from partial_fc.classifier import IMPLS, SWEEPS  # noqa: E402
from partial_fc.optim import build_classifier_optimizer  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--classes", type=int, default=100_000, help="classes on this device")
    p.add_argument("--batch", type=int, default=1024, help="global (gathered) batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--head", choices=sorted(npc_head.HEADS), default="npcface")
    p.add_argument("--build", choices=["api", "config"], default="api",
                   help="api: PartialFC(head, D, C) and its defaults; config: the training config")
    p.add_argument("--impl", choices=IMPLS, default=None, help="default: the API's / config's")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="chunked: tile functions compiled (default: the API's / config's)")
    p.add_argument("--sweep", choices=SWEEPS, default=None,
                   help="chunked: chunks of rows (3 GEMMs) or blocks of classes (4 GEMMs)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="time the step's bare GEMMs before each step (gemm_floor_ms)")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=None, help="chunked: classes per block")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="the GEMMs' input dtype (statistics fp32); default bf16 on CUDA")
    p.add_argument("--optimizer", choices=["rowsparse", "torch"], default="rowsparse",
                   help="row-sparse SGD (sampled rows only) or torch.optim.SGD (every row)")
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 10 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="default: 5 on CPU, 30 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    return p.parse_args(argv)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gemm_floor(embeddings, weight, rows_scored, block, gemm_dtype):
    """The three GEMMs of one classifier step and nothing else, on the step's shapes:
    per block of ``block`` of the first ``rows_scored`` weight rows, the logit tile
    E @ W_b^T, the embedding gradient tile @ W_b (accumulated) and the weight gradient
    tile^T @ E (same flops as the head's forward and backward GEMMs; the class sweep adds a
    fourth, the forward tile recomputed in backward)."""
    e = embeddings.to(gemm_dtype)
    grad_e = torch.zeros(e.shape, dtype=torch.float32, device=e.device)
    tile = None
    for start in range(0, rows_scored, block):
        w = weight[start:start + block].to(gemm_dtype)
        tile = torch.matmul(e, w.t(), out=None if tile is None or tile.shape[1] != w.shape[0]
                            else tile)
        grad_e += torch.matmul(tile, w).float()
        torch.matmul(tile.t(), e)
    return grad_e


def classifier_options(args, precision: str) -> dict:
    """The options given on the command line (the others keep the API's or config's)."""
    given = dict(impl=args.impl, fused=args.fused, sweep=args.sweep, block_size=args.block_size)
    options = {k: v for k, v in given.items() if v is not None}
    options["gemm_dtype"] = "bfloat16" if precision == "bf16" else "float32"
    return options


def build_from_config(args, options: dict):
    """``builders.build_classifier`` on ``conf/config.yaml`` with ``head=<head>``."""
    from hydra import compose, initialize_config_dir

    from partial_fc.train.builders import build_classifier

    overrides = [f"head={args.head}", f"model.embedding_size={args.dim}",
                 f"head.sample_rate={args.sample_rate}", f"trainer.seed={args.seed}"]
    overrides += [f"head.{k}={'null' if v is None else str(v).lower()}" for k, v in options.items()
                  if k != "gemm_dtype"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    module = build_classifier(cfg, args.classes)
    module.gemm_dtype = partial_fc.classifier.GEMM_DTYPES[options["gemm_dtype"]]
    return module


def build(args, device, precision):
    options = classifier_options(args, precision)
    if args.build == "config":
        module = build_from_config(args, options)
    else:
        module = partial_fc.PartialFC(npc_head.HEADS[args.head](), args.dim, args.classes,
                                      sample_rate=args.sample_rate, seed=args.seed, **options)
    module = module.to(device)
    if args.optimizer == "torch":
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = build_classifier_optimizer(module, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    return module, opt


def _timed(fn, device, times, cpu_times):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if times is not None:
        times.append((time.perf_counter() - start) * 1e3)
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/head.py: --device cuda but torch.cuda.is_available() is False")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    iters = args.iters if args.iters is not None else (30 if device.type == "cuda" else 5)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    module, opt = build(args, device, precision)
    # A fresh synthetic batch every step (a few kept on the device), so the head does not
    # memorise one batch and the NPCFace statistics stay those of random embeddings.
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    batches = [(torch.randn(args.batch, args.dim, generator=generator).to(device),
                torch.randint(0, args.classes, (args.batch,), generator=generator).to(device))
               for _ in range(4)]
    rss_before = peak_rss_bytes()

    def step(i):
        embeddings, labels = batches[i % len(batches)]
        loss = module(embeddings.detach().requires_grad_(True), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    floor_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    times, cpu_times, floor_times, floor_cpu = [], [], [], []
    loss = None
    for i in range(warmup + iters):
        keep = i >= warmup
        plan = module.last_plan
        if args.floor and plan is not None:  # the floor of the step's own shapes and blocks
            scored = int(module.sampled_index.numel())
            block = plan.block_size if plan.impl == "chunked" else scored  # as in RESULTS.md
            with torch.no_grad():
                _timed(lambda: gemm_floor(batches[i % 4][0], module.weight, scored, block,
                                          floor_dtype), device,
                       floor_times if keep else None, floor_cpu)
        loss = _timed(lambda: step(i), device, times if keep else None, cpu_times)
    if not torch.isfinite(loss.detach()):
        sys.exit(f"bench/head.py: non-finite loss {float(loss)}")
    print(json.dumps(record(args, module, device, precision, warmup, iters, loss, times,
                            cpu_times, floor_times, floor_cpu, rss_before)), flush=True)


def record(args, module, device, precision, warmup, iters, loss, times, cpu_times, floor_times,
           floor_cpu, rss_before) -> dict:
    """The JSON line: the configuration, the step's plan, times and memory."""
    plan = module.last_plan
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    out = {
        "bench": "head", "device": device.type, "head": args.head, "build": args.build,
        "impl": module.impl, "fused": module.fused, "sweep": module.sweep,
        "resolved_impl": plan.impl, "resolved_sweep": plan.sweep, "chunk_rows": plan.chunk_rows,
        "block_size": plan.block_size, "compiled": plan.compiled, "classes": args.classes,
        "batch": args.batch, "dim": args.dim, "sample_rate": args.sample_rate,
        "precision": precision, "optimizer": args.optimizer, "warmup": warmup, "iters": iters,
        "ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3),
        "ms_max": round(max(times), 3), "peak_bytes": int(peak),
        "peak_gib": round(peak / 2**30, 3), "loss": round(float(loss.detach()), 5),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if floor_times:
        floor_ms = statistics.median(floor_times)
        out.update(gemm_floor_ms=round(floor_ms, 3), gemm_floor_ms_min=round(min(floor_times), 3),
                   floor_ratio=round(out["ms"] / floor_ms, 3),
                   floor_ratio_best=round(min(times) / min(floor_times), 3))
    if device.type == "cpu":  # process CPU time says nothing about a GPU's work
        out.update(cpu_ms=round(statistics.median(cpu_times), 3),
                   rss_before_step_bytes=int(rss_before))
        if floor_times:
            out.update(gemm_floor_cpu_ms=round(statistics.median(floor_cpu), 3),
                       floor_ratio_cpu=round(out["cpu_ms"] / statistics.median(floor_cpu), 3))
    else:
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


if __name__ == "__main__":
    main()
