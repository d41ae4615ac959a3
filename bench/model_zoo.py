"""Parameters and forward FLOPs of each backbone for one 112x112 image, printed as JSON lines.

    python bench/model_zoo.py --models r50 r100 mbf vit_t vit_s vit_b vit_l

FLOPs are counted by torch.utils.flop_counter (2 per multiply-add, matmuls, convolutions and
attention; elementwise ops not counted) on the meta device, so nothing is computed.
"""
import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from partial_fc.models import MODEL_NAMES, get_model


def measure(name):
    with torch.device("meta"):
        model = get_model(name).eval()
        x = torch.empty(1, 3, 112, 112)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return {"model": name, "params_M": round(params / 1e6, 2),
            "gflops": round(counter.get_total_flops() / 1e9, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    for name in parser.parse_args().models:
        print(json.dumps(measure(name)), flush=True)


if __name__ == "__main__":
    main()
