"""Samples per second of a full training step on synthetic inputs: backbone forward, the sharded
classifier head, backward, and both optimizer updates (backbone SGD, row-sparse classifier SGD).

    python bench/train_step.py --device cuda --model r50 --batch 256

CUDA defaults: channels_last and bf16 autocast for the backbone; the head runs its GEMMs in bf16
with fp32 statistics. Prints one JSON line with ``samples_per_s`` and ``ms`` (median step).
The backbone comes from ``partial_fc.models.get_model``; if that is not available in this
checkout, torchvision's resnet50 stands in (marked in the output), else the script stops with a
message saying so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import npc_head  # noqa: E402
import partial_fc  # noqa: E402
from partial_fc.optim import build_classifier_optimizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--model", default="r50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--classes", type=int, default=11_680,
                   help="classes on this device (default: MS1MV3's 93,431 over 8 GPUs)")
    p.add_argument("--head", choices=["npcface", "arcface", "none"], default="npcface",
                   help="none: backbone only (as the anchor's backbone rows, bench/RESULTS.md)")
    p.add_argument("--impl", choices=partial_fc.classifier.IMPLS, default="auto")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="backbone autocast; default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA")
    p.add_argument("--warmup", type=int, default=None, help="default: 10 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default: 30 on CUDA, 2 on CPU")
    return p.parse_args(argv)


def load_backbone(name: str, dim: int):
    """(backbone, source): partial_fc.models.get_model, or torchvision's resnet50 for r50."""
    try:
        from partial_fc.models import get_model
    except ImportError as exc:
        reason = f"partial_fc.models.get_model is not available ({exc})"
    else:
        return get_model(name, embedding_size=dim), "partial_fc.models"
    if name != "r50":
        sys.exit(f"bench/train_step.py: {reason}; only r50 has a stand-in (torchvision resnet50)")
    try:
        import torchvision  # optional, only as a stand-in
    except ImportError:
        sys.exit(f"bench/train_step.py: {reason}, and torchvision (the r50 stand-in) is not "
                 "installed: use a checkout that has partial_fc/models")
    print(f"bench/train_step.py: {reason}; using torchvision resnet50 as a stand-in",
          file=sys.stderr)
    return torchvision.models.resnet50(num_classes=dim), "torchvision.resnet50"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/train_step.py: --device cuda but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"
    precision = args.precision or ("bf16" if cuda else "fp32")
    channels_last = cuda if args.channels_last is None else args.channels_last
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    iters = args.iters if args.iters is not None else (30 if cuda else 2)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    backbone, source = load_backbone(args.model, args.dim)
    backbone = backbone.to(device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    opt_backbone = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    head = opt_head = None
    if args.head != "none":
        margin = npc_head.NPCFace() if args.head == "npcface" else npc_head.ArcFace(m=0.5)
        head = partial_fc.PartialFC(margin, args.dim, args.classes, sample_rate=args.sample_rate,
                                    impl=args.impl).to(device)
        opt_head = build_classifier_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            embeddings = backbone(images)
            loss = head(embeddings, labels) if head is not None else embeddings.float().square().mean()
        scaler.scale(loss).backward()
        for opt in (opt_backbone, opt_head):
            if opt is not None:
                scaler.step(opt)
        scaler.update()
        for opt in (opt_backbone, opt_head):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    record = {
        "bench": "train_step", "device": device.type, "model": args.model, "backbone": source,
        "batch": args.batch, "head": args.head, "classes": args.classes,
        "impl": head.last_impl if head is not None else None, "sample_rate": args.sample_rate,
        "precision": precision, "channels_last": channels_last, "warmup": warmup, "iters": iters,
        "ms": round(median * 1e3, 3), "samples_per_s": round(args.batch / median, 1),
        "torch": torch.__version__,
    }
    if cuda:
        record["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        record["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
