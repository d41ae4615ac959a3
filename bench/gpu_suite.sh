#!/usr/bin/env bash
# The Performance issue's CUDA measurements in one go (one H200 or similar):
#   classifier head: 1M / 4M / 16M classes on the device, global batch 1024, D 512,
#   NPCFace and ArcFace, the API default, the reference path and the chunked path with the class
#   sweep, the row sweep and eager tiles forced (to settle the CUDA choice), sample rate 1.0 and
#   0.1, each with its bare-GEMM floor (bf16, same shapes) and the ratio (configurations that
#   cannot fit the device are skipped: see bench/head_suite.py; `--preset gpu-quick`: 10 minutes);
#   full training step: r50 at batch 128 and 256 (channels_last, bf16 autocast).
# Prints every JSON line and a Markdown table per part. Usage, from the repository root:
#   bash bench/gpu_suite.sh [python]        # e.g. bash bench/gpu_suite.sh .venv/bin/python
set -uo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
"$PY" -c "import torch; print('#', torch.__version__, torch.cuda.get_device_name(0))"

echo "## Classifier head (CUDA)"
"$PY" bench/head_suite.py --preset gpu --timeout 900

echo
echo "## Training step (CUDA)"
echo "| model | batch | head | samples/s | ms |"
echo "|---|---|---|---|---|"
for batch in 128 256; do
  for head in npcface none; do
    line=$("$PY" bench/train_step.py --device cuda --model r50 --batch "$batch" --head "$head" | tail -n 1)
    echo "$line" >&2
    "$PY" -c "import json,sys; r=json.loads(sys.argv[1]); print(f\"| {r['model']} ({r['backbone']}) | {r['batch']} | {r['head']} | {r['samples_per_s']} | {r['ms']} |\")" "$line" \
      || echo "| r50 | $batch | $head | failed | |"
  done
done
