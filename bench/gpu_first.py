"""The checks of bench/gpu_first.sh that are Python: each prints JSON rows ``{"part", "status",
"detail", ...figures}`` (status ``ok``, ``failed`` or ``skipped``) for the table at the end.

    python bench/gpu_first.py versions           # torch, CUDA, NCCL, Triton compile, mm out_dtype
    python bench/gpu_first.py classifier         # one GPU's share of each shipped recipe
    torchrun --nproc_per_node=1 bench/gpu_first.py nccl
    python bench/gpu_first.py shared-gpu         # 2 gloo ranks on one device against one unsharded copy
    python bench/gpu_first.py trainer RUN_DIR FP16_DIR BENCH_JSON   # the 40-step run against the bench
    python bench/gpu_first.py row PART STATUS DETAIL                # a row the shell script writes
    python bench/gpu_first.py table ROWS.jsonl   # the Markdown table

Without CUDA every check runs on the CPU where it can (the classifier with its global batch
capped at ``CPU_GLOBAL_BATCH``) and says what it skipped.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONF = Path(__file__).resolve().parents[1] / "conf"
# GPUs of each shipped recipe, as its conf/experiment/*.yaml header says: one GPU holds
# num_classes / GPUs classes and scores the gathered batch of GPUs x data.batch_size.
RECIPE_GPUS = {
    "ms1mv2_r100_npcface": 8,
    "ms1mv3_r100_npcface": 8,
    "glint360k_r100_npcface": 8,
    "webface42m_r100_pfc02_npcface": 64,
    "webface42m_vit_b_npcface": 64,
}
CPU_GLOBAL_BATCH = 1024  # without CUDA the recipes' gathered batches (up to 24,576) take minutes
# Largest relative error of the loss or a gradient against the fp32 reference that passes: bf16
# GEMM inputs (8-bit mantissa) give about 1e-3 to 1e-2; a wrong statistic gives 1e-1 and more.
REFERENCE_TOLERANCE = 5e-2


def emit(part: str, status: str, detail: str = "", **figures) -> dict:
    row = {"part": part, "status": status, "detail": detail, **figures}
    print(json.dumps(row), flush=True)
    return row


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------- versions
def versions(_args) -> None:
    dev = device()
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
    emit("versions", "ok", ", ".join(f"{k} {v}" for k, v in info.items()), **info)
    compiler = "Triton" if dev.type == "cuda" else "C++ (inductor)"
    try:
        fn = torch.compile(lambda x: torch.exp(x - x.amax(dim=1, keepdim=True)).sum(dim=1), dynamic=True)
        x = torch.randn(64, 300, device=dev)
        start = time.perf_counter()
        got = fn(x)
        seconds = time.perf_counter() - start
        want = torch.exp(x - x.amax(dim=1, keepdim=True)).sum(dim=1)
        torch.testing.assert_close(got, want)
        emit("compile", "ok", f"{compiler} compiles and matches eager in {seconds:.1f}s", seconds=round(seconds, 1))
    except Exception as err:  # noqa: BLE001 - reported as the row's outcome
        emit("compile", "failed", f"{compiler}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if dev.type != "cuda":
        emit("mm out_dtype", "skipped", "no CUDA (torch.mm(out_dtype=) has no CPU kernel)")
        return
    try:
        a = torch.randn(256, 512, device=dev, dtype=torch.bfloat16)
        b = torch.randn(512, 128, device=dev, dtype=torch.bfloat16)
        got = torch.mm(a, b, out_dtype=torch.float32)
        want = a.double() @ b.double()
        error = float((got.double() - want).abs().max() / want.abs().max())
        emit("mm out_dtype", "ok" if got.dtype == torch.float32 and error < 1e-2 else "failed",
             f"bf16 x bf16 -> {got.dtype}, max relative error {error:.1e}", error=error)
    except Exception as err:  # noqa: BLE001
        emit("mm out_dtype", "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")


# ----------------------------------------------------------------------------- classifier
def recipe_config(name: str, overrides=()):
    from hydra import compose, initialize_config_dir

    trainer = [] if torch.cuda.is_available() else ["trainer=cpu"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", *trainer, *overrides])


def count_syncs(step) -> int:
    """Host syncs of ``step()``: CUDA's sync debug mode counts every one (nonzero and unique
    included); on CPU the profiler's ``HOST_SYNC_EVENTS`` (item, bool, int, float, the
    classifier's marked reads, data-dependent shapes)."""
    if torch.cuda.is_available():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    from torch.profiler import ProfilerActivity, profile

    from partial_fc.classifier.collectives import HOST_SYNC_EVENTS

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name in HOST_SYNC_EVENTS)


def classifier_share(name: str, warmup: int, iters: int) -> None:
    """One GPU's classifier step of recipe ``name`` as the trainer runs it (built by
    ``builders.build_classifier`` from the recipe; fp32 embeddings outside autocast; labels drawn
    from this GPU's classes, as bench/head.py draws them), against the fp32 reference path."""
    from partial_fc.train import builders

    cfg = recipe_config(name)
    gpus = RECIPE_GPUS[name]
    dev = device()
    classes = int(cfg.data.num_classes) // gpus
    batch = gpus * int(cfg.data.batch_size)
    capped = dev.type == "cpu" and batch > CPU_GLOBAL_BATCH
    batch = min(batch, CPU_GLOBAL_BATCH) if dev.type == "cpu" else batch
    torch.manual_seed(0)
    clf = builders.build_classifier(cfg, classes).to(dev)
    _, opt = builders.build_optimizers(cfg.optim, torch.nn.Linear(1, 1), clf)  # the recipe's rule; no backbone
    embeddings = torch.randn(batch, clf.embedding_size, device=dev)
    labels = torch.randint(0, classes, (batch,), device=dev)

    def step():
        x = embeddings.clone().requires_grad_(True)
        clf(x, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    syncs = count_syncs(step)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    tiles = bool(clf.fused and clf.last_impl == "chunked")
    errors = reference_errors(name, clf, embeddings, labels)
    note = f"; global batch capped at {CPU_GLOBAL_BATCH} on CPU" if capped else ""
    worst = max(errors.values())
    emit(f"classifier {name}", "ok" if worst <= REFERENCE_TOLERANCE else "failed",
         f"{classes:,} classes x {batch:,} rows, {clf.last_impl}, tiles {'on' if tiles else 'off'}{note}",
         classes=classes, global_batch=batch, ms=round(statistics.median(times) * 1e3, 2),
         peak_gib=None if peak is None else round(peak, 2), syncs_per_step=syncs, impl=clf.last_impl,
         compiled_tiles=tiles, **errors)


def reference_errors(name: str, clf, embeddings, labels) -> dict:
    """Relative errors of the configured step's loss and gradients against the reference path
    of recipe ``name`` in exact fp32 (no TF32), with the same weights and sampled classes."""
    from partial_fc.train import builders

    ref_cfg = recipe_config(name, ["head.impl=reference", "head.fused=false", "trainer.precision=fp32"])
    ref = builders.build_classifier(ref_cfg, clf.num_classes).to(embeddings.device)
    ref.load_state_dict(clf.state_dict())
    step = int(clf.sample_step)
    outputs = []
    precision = torch.get_float32_matmul_precision()
    for module in (clf, ref):
        if module is ref:
            torch.set_float32_matmul_precision("highest")
        x = embeddings.clone().requires_grad_(True)
        module.sample_step.fill_(step)  # the same sampled classes
        loss = module(x, labels)
        loss.backward()
        outputs.append((loss.detach().double(), x.grad.double(), module.weight.grad.double()))
        module.weight.grad = None
    torch.set_float32_matmul_precision(precision)
    (loss, ge, gw), (rloss, rge, rgw) = outputs
    return {"loss_error": float((loss - rloss).abs() / rloss.abs()),
            "grad_embeddings_error": float((ge - rge).norm() / rge.norm()),
            "grad_weight_error": float((gw - rgw).norm() / rgw.norm())}


def classifier(args) -> None:
    dev = device()
    warmup, iters = (3, 10) if dev.type == "cuda" else (1, 1)
    for name in args.recipes or RECIPE_GPUS:
        try:
            classifier_share(name, warmup, iters)
        except Exception as err:  # noqa: BLE001 - one recipe's failure is its row
            emit(f"classifier {name}", "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- collectives
def nccl(_args) -> None:
    """The collectives the training uses, on a one-rank NCCL group (under torchrun)."""
    import os

    import torch.distributed as dist

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        emit("nccl (1 rank)", "skipped", "no CUDA" if not torch.cuda.is_available() else "no NCCL in this torch")
        return
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", timeout=timedelta(seconds=60), device_id=dev)
    try:
        x = torch.arange(12, dtype=torch.float32, device=dev)
        checks = {}
        reduced = x.clone()
        dist.all_reduce(reduced)
        checks["all_reduce"] = torch.equal(reduced, x)
        gathered = torch.empty_like(x)
        dist.all_gather_into_tensor(gathered, x)
        checks["all_gather_into_tensor"] = torch.equal(gathered, x)
        scattered = torch.empty_like(x)
        dist.reduce_scatter_tensor(scattered, x)
        checks["reduce_scatter_tensor"] = torch.equal(scattered, x)
        sent = x.to(torch.bfloat16)
        dist.broadcast(sent, src=0)
        checks["broadcast bf16"] = torch.equal(sent, x.to(torch.bfloat16))
        torch.cuda.synchronize()
        bad = [k for k, ok in checks.items() if not ok]
        emit("nccl (1 rank)", "failed" if bad else "ok",
             f"wrong: {', '.join(bad)}" if bad else f"{', '.join(checks)} exact")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHARED = dict(classes=1000, dim=64, local_batch=32, ranks=2)


def _shared_rank(rank: int, port: int, impl: str, queue) -> None:
    import torch.distributed as dist

    import npc_head
    import partial_fc

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=SHARED["ranks"], timeout=timedelta(seconds=60))
    try:
        dev = device()
        weight, embeddings, labels = _shared_inputs(dev)
        clf = partial_fc.PartialFC(npc_head.NPCFace(), SHARED["dim"], SHARED["classes"], impl=impl).to(dev)
        with torch.no_grad():
            clf.weight.copy_(weight[clf.class_start:clf.class_start + clf.num_local])
        b = SHARED["local_batch"]
        x = embeddings[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        loss = clf(x, labels[rank * b:(rank + 1) * b])
        loss.backward()
        # numpy arrays travel by value (a tensor would be shared memory this process takes away)
        queue.put((rank, float(loss), x.grad.cpu().numpy(), clf.weight.grad.cpu().numpy(), clf.class_start))
    except Exception as err:  # noqa: BLE001 - reported by the parent
        queue.put((rank, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"))
    finally:
        dist.destroy_process_group()


def _shared_inputs(dev):
    g = torch.Generator().manual_seed(0)
    n = SHARED["local_batch"] * SHARED["ranks"]
    return (torch.randn(SHARED["classes"], SHARED["dim"], generator=g).to(dev),
            torch.randn(n, SHARED["dim"], generator=g).to(dev),
            torch.randint(0, SHARED["classes"], (n,), generator=g).to(dev))


def shared_gpu(_args) -> None:
    """Two gloo ranks on one device (the GPU, else the CPU), each with half the classes and half
    the batch, against one unsharded classifier on the whole batch: loss and gradients."""
    import torch.multiprocessing as mp

    import npc_head
    import partial_fc

    dev = device()
    for impl in ("reference", "chunked"):
        part = f"2 ranks on one {dev.type.upper()} ({impl})"
        ctx = mp.get_context("spawn")
        queue, port = ctx.Queue(), _free_port()
        procs = [ctx.Process(target=_shared_rank, args=(r, port, impl, queue)) for r in range(SHARED["ranks"])]
        for p in procs:
            p.start()
        try:
            results = sorted(queue.get(timeout=120) for _ in procs)
        except Exception as err:  # noqa: BLE001 - queue.Empty: a rank hung or died
            emit(part, "failed", f"no result from every rank ({type(err).__name__})")
            continue
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        failures = [r for r in results if isinstance(r[1], str)]
        if failures:
            emit(part, "failed", "; ".join(f"rank {r}: {msg}" for r, msg in failures))
            continue
        weight, embeddings, labels = _shared_inputs(dev)
        whole = partial_fc.PartialFC(npc_head.NPCFace(), SHARED["dim"], SHARED["classes"], impl=impl).to(dev)
        with torch.no_grad():
            whole.weight.copy_(weight)
        x = embeddings.clone().requires_grad_(True)
        loss = whole(x, labels)
        loss.backward()
        ge = torch.cat([torch.from_numpy(r[2]) for r in results]).double()
        gw = torch.cat([torch.from_numpy(r[3]) for r in results]).double()
        errors = {"loss_error": max(abs(r[1] - float(loss)) / abs(float(loss)) for r in results),
                  "grad_embeddings_error": float((ge - x.grad.cpu().double()).norm() / x.grad.norm()),
                  "grad_weight_error": float((gw - whole.weight.grad.cpu().double()).norm()
                                             / whole.weight.grad.norm())}
        worst = max(errors.values())
        emit(part, "ok" if worst < 1e-4 else "failed", f"largest relative error {worst:.1e}", **errors)


# ----------------------------------------------------------------------------- trainer
def _metrics(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def trainer(args) -> None:
    """The 40-step run (stopped at 20, resumed) and the fp16 run, against bench/train_step.py."""
    run_dir, fp16_dir = Path(args.run_dir), Path(args.fp16_dir)
    records = [r for r in _metrics(run_dir) if "loss" in r]
    steps = sorted({r["step"] for r in records})
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    ok = summary.get("steps") == 40 and "step_00000020" in saved and steps and steps[-1] == 40
    emit("40 steps, checkpoint, resume", "ok" if ok else "failed",
         f"logged steps {steps[:1]}..{steps[-1:]}, checkpoints {saved}, summary steps {summary.get('steps')}",
         final_loss=records[-1]["loss"] if records else None)
    fp16 = [r for r in _metrics(fp16_dir) if "loss" in r]
    fp16_summary = (json.loads((fp16_dir / "summary.json").read_text())
                    if (fp16_dir / "summary.json").exists() else {})
    emit("fp16 leg", "ok" if fp16_summary.get("steps") and fp16 else "failed",
         f"steps {fp16_summary.get('steps')}, skipped {fp16_summary.get('skipped_steps')}, "
         f"loss scale {fp16[-1].get('amp_scale') if fp16 else None}")
    try:
        bench = json.loads(Path(args.bench_json).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        emit("trainer step vs bench", "failed", f"no bench/train_step.py record in {args.bench_json}")
        return
    trained = records[-1].get("samples_per_sec") if records else None
    if not trained:
        emit("trainer step vs bench", "failed", "no samples_per_sec logged by the run")
        return
    ratio = trained / bench["samples_per_s"]
    emit("trainer step vs bench", "ok", f"training {trained:.0f} samples/s (steps 31-40, data loader "
         f"included), bench {bench['samples_per_s']:.0f}: {ratio:.2f}x", ratio=round(ratio, 3),
         train_samples_per_s=round(trained, 1), bench_samples_per_s=bench["samples_per_s"], bench_ms=bench["ms"])


# ----------------------------------------------------------------------------- table
FIGURES = ("ms", "peak_gib", "syncs_per_step", "compiled_tiles", "loss_error", "grad_embeddings_error",
           "grad_weight_error", "ratio")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 1e-2 else f"{value:g}"
    return "" if value is None else str(value)


def table(args) -> None:
    rows = []
    for line in Path(args.rows).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    print("| part | status | " + " | ".join(FIGURES) + " | detail |")
    print("|---|---|" + "---|" * len(FIGURES) + "---|")
    for r in rows:
        cells = [_cell(r.get(k)) for k in FIGURES]
        print(f"| {r['part']} | {r['status']} | " + " | ".join(cells) + f" | {r.get('detail', '')} |")
    failed = [r["part"] for r in rows if r["status"] == "failed"]
    skipped = [r["part"] for r in rows if r["status"] == "skipped"]
    print(f"\n{len(rows)} checks: {len(rows) - len(failed) - len(skipped)} ok, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}, {len(skipped)} skipped"
          f"{' (' + ', '.join(skipped) + ')' if skipped else ''}")
    sys.exit(1 if failed else 0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("versions").set_defaults(fn=versions)
    c = sub.add_parser("classifier")
    c.add_argument("--recipes", nargs="*", choices=sorted(RECIPE_GPUS))
    c.set_defaults(fn=classifier)
    sub.add_parser("nccl").set_defaults(fn=nccl)
    sub.add_parser("shared-gpu").set_defaults(fn=shared_gpu)
    t = sub.add_parser("trainer")
    t.add_argument("run_dir")
    t.add_argument("fp16_dir")
    t.add_argument("bench_json")
    t.set_defaults(fn=trainer)
    r = sub.add_parser("row")
    r.add_argument("part")
    r.add_argument("status", choices=["ok", "failed", "skipped"])
    r.add_argument("detail")
    r.set_defaults(fn=lambda a: emit(a.part, a.status, a.detail))
    tb = sub.add_parser("table")
    tb.add_argument("rows")
    tb.set_defaults(fn=table)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
