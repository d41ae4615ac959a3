"""Backbone throughput: forward + backward + SGD step, images per second, printed as JSON.

    python bench/bench_backbones.py --models tiny r18 --batch-size 64 --threads 2 --steps 5
"""
import argparse
import json
import time

import torch

from partial_fc.models import get_model


def measure(name, batch_size, steps, warmup, channels_last, device, amp):
    model = get_model(name).to(device).train()
    x = torch.randn(batch_size, 3, 112, 112, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    cpu_elapsed = time.process_time() - cpu_start
    return {"model": name, "params": sum(p.numel() for p in model.parameters()),
            "batch_size": batch_size, "channels_last": channels_last, "amp": amp,
            "device": str(device), "threads": torch.get_num_threads(),
            "img_per_s": round(batch_size * steps / elapsed, 1),
            # CPU seconds of this process: on a shared machine, img_per_s is lowered by other
            # work while img_per_cpu_s is not (x threads ~ the throughput of idle cores)
            "img_per_cpu_s": round(batch_size * steps / max(cpu_elapsed, 1e-9), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        print(json.dumps(measure(name, args.batch_size, args.steps, args.warmup,
                                 args.channels_last, torch.device(args.device), args.amp)))


if __name__ == "__main__":
    main()
