"""Step time and peak memory of the classifier head alone: forward, backward and the
SGD-momentum update of one device's class shard, for a synthetic global batch.

    python bench/head.py --device cpu --classes 100000 --batch 1024 --head npcface --impl chunked

Every step is preceded by the bare GEMMs of that step's shapes (``gemm_floor_ms``,
median; see :func:`gemm_floor`), so ``floor_ratio`` = ms / gemm_floor_ms compares the step with
its three-GEMM floor measured under the same machine load.

Prints one JSON line: ``ms`` (median step), ``peak_bytes`` (CUDA: max allocated; CPU: the
process's peak RSS, so run one configuration per process), the resolved implementation and
the configuration.
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
from partial_fc.chunked import default_block_size  # noqa: E402
from partial_fc.optim import build_classifier_optimizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--classes", type=int, default=100_000, help="classes on this device")
    p.add_argument("--batch", type=int, default=1024, help="global (gathered) batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--head", choices=["npcface", "arcface"], default="npcface")
    p.add_argument("--impl", choices=partial_fc.classifier.IMPLS, default="chunked")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=False,
                   help="chunked: one compiled pass per tile and direction (head.fused)")
    p.add_argument("--sweep", choices=partial_fc.chunked.SWEEPS, default="auto",
                   help="chunked: chunks of rows (3 GEMMs) or blocks of classes (4 GEMMs)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="time the step's bare GEMMs before each step (gemm_floor_ms)")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=None, help="chunked: classes per block")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16: GEMMs in bf16 (autocast), statistics fp32; default bf16 on CUDA")
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
    tile^T @ E (same flops as the head's forward and backward GEMMs; the chunked path adds a
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


def build(args, device):
    head = npc_head.NPCFace() if args.head == "npcface" else npc_head.ArcFace(m=0.5)
    module = partial_fc.PartialFC(
        head, args.dim, args.classes, sample_rate=args.sample_rate, impl=args.impl,
        block_size=args.block_size, seed=args.seed, fused=args.fused, sweep=args.sweep,
    ).to(device)
    if args.optimizer == "torch":
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = build_classifier_optimizer(module, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    return module, opt


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
    module, opt = build(args, device)
    # A fresh synthetic batch every step (a few kept on the device), so the head does not
    # memorise one batch and the NPCFace statistics stay those of random embeddings.
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    batches = [
        (torch.randn(args.batch, args.dim, generator=generator).to(device),
         torch.randint(0, args.classes, (args.batch,), generator=generator).to(device))
        for _ in range(4)
    ]
    rss_before = peak_rss_bytes()

    def step(i):
        embeddings, labels = batches[i % len(batches)]
        emb = embeddings.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = module(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    scored = max(1, int(args.sample_rate * module.num_local))
    chunk_rows = partial_fc.chunked.plan_chunk_rows(args.sweep, args.fused, args.batch, scored,
                                                    device)
    floor_block = args.block_size or default_block_size(args.batch, device)
    if args.impl == "reference" or module.resolve_impl(args.batch, scored) == "reference":
        floor_block = scored  # the reference path's GEMMs are whole
    floor_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def floor(i):
        with torch.no_grad():
            gemm_floor(batches[i % len(batches)][0], module.weight, scored, floor_block,
                       floor_dtype)

    times, cpu_times, floor_times, floor_cpu = [], [], [], []
    for i in range(warmup + iters):
        if args.floor:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            floor(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                floor_times.append((time.perf_counter() - start) * 1e3)
                floor_cpu.append((time.process_time() - cpu_start) * 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
    if not torch.isfinite(loss.detach()):
        sys.exit(f"bench/head.py: non-finite loss {float(loss)}")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
    record = {
        "bench": "head", "device": device.type, "head": args.head, "impl": args.impl,
        "resolved_impl": module.last_impl, "classes": args.classes, "batch": args.batch,
        "dim": args.dim, "sample_rate": args.sample_rate, "block_size": args.block_size,
        "precision": precision, "optimizer": args.optimizer, "warmup": warmup, "iters": iters,
        "ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3),
        "ms_max": round(max(times), 3), "cpu_ms": round(statistics.median(cpu_times), 3),
        "peak_bytes": int(peak),
        "peak_gib": round(peak / 2**30, 3), "loss": round(float(loss.detach()), 5),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "fused": args.fused,
        "sweep": args.sweep, "chunk_rows": chunk_rows,
        "resolved_sweep": (("rows" if chunk_rows else "classes")
                           if module.last_impl == "chunked" else None),
    }
    if floor_times:
        floor_ms = statistics.median(floor_times)
        record.update(gemm_floor_ms=round(floor_ms, 3), gemm_floor_ms_min=round(min(floor_times), 3),
                      floor_ratio=round(record["ms"] / floor_ms, 3),
                      floor_ratio_best=round(min(times) / min(floor_times), 3),
                      gemm_floor_cpu_ms=round(statistics.median(floor_cpu), 3),
                      floor_ratio_cpu=round(record["cpu_ms"] / statistics.median(floor_cpu), 3))
    if device.type == "cpu":
        record["rss_before_step_bytes"] = int(rss_before)
    else:
        record["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
