#!/usr/bin/env bash
# The CUDA measurements of bench/RESULTS.md in one go (one H200 or similar):
#   classifier head: 1M / 4M / 16M classes on the device, global batch 1024, D 512,
#   NPCFace and ArcFace, the API default, the reference path and the chunked path with the class
#   sweep, the row sweep and eager tiles forced (to settle the CUDA choice), sample rate 1.0 and
#   0.1, each with its bare-GEMM floor (bf16, same shapes) and the ratio (configurations that
#   cannot fit the device are skipped: see bench/head_suite.py; `--preset gpu-quick`: 10 minutes);
#   full training step: Trainer.train_step() of r50 at batch 128 and 256 (trainer=gpu:
#   channels_last, bf16 autocast; bench/train_step.py).
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
echo "## Training step (CUDA): Trainer.train_step() of trainer=gpu (bf16, channels_last), NPCFace"
echo "| model | batch | classes/GPU | impl | samples/s | ms | peak GiB |"
echo "|---|---|---|---|---|---|---|"
for batch in 128 256; do
  line=$("$PY" bench/train_step.py --model r50 --batch "$batch" | tail -n 1)
  echo "$line" >&2
  "$PY" -c "import json,sys; r=json.loads(sys.argv[1]); print(f\"| {r['model']} | {r['batch']} | {r['classes_per_rank']} | {r['impl']} | {r['samples_per_s']} | {r['ms']} | {r['peak_gib']} |\")" "$line" \
    || echo "| r50 | $batch | | | failed | | |"
done
