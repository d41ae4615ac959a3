#!/usr/bin/env bash
# The first ten minutes on one GPU: what a first device session runs, with one table at the end.
#   1. versions and capabilities: torch, CUDA, NCCL, GPU; a Triton compile; torch.mm(out_dtype=)
#   2. the CUDA tests (pytest -m cuda)
#   3. the classifier at one GPU's share of each shipped recipe (conf/experiment): ms, peak GiB,
#      host syncs per step, compiled tiles active, error against the fp32 reference path
#   4. NCCL on one rank: the collectives training uses
#   5. two ranks sharing the GPU over gloo against one unsharded copy
#   6. bench/train_step.py, then a 40-step run (stopped at 20 with a checkpoint, resumed) compared
#      with it, and a 20-step fp16 run (6 on a CPU)
# Without CUDA it runs the same parts on the CPU where it can (tiny model, smaller batches) and
# says what it skipped. Every part has a time cap inside an overall budget (PFC_GPU_FIRST_BUDGET_S,
# default 540 s) and a part that does not fit is marked skipped. Usage, from anywhere:
#   bash bench/gpu_first.sh [python] [output dir]   # defaults: .venv/bin/python, outputs/gpu_first
# Output dir: rows.jsonl (one JSON row per check), log.txt (everything else), table.md.
# Exit status: 0 when no check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
OUT=${2:-outputs/gpu_first}
mkdir -p "$OUT"
ROWS="$OUT/rows.jsonl"
LOG="$OUT/log.txt"
: > "$ROWS"
: > "$LOG"
BUDGET=${PFC_GPU_FIRST_BUDGET_S:-540}
START=$(date +%s)

row() { "$PY" bench/gpu_first.py row "$1" "$2" "$3" >> "$ROWS"; }

# part NAME CAP_S COMMAND...: run COMMAND (its JSON rows to rows.jsonl, the rest to log.txt)
# within min(CAP_S, what is left of the budget); a timeout or a failure without a row of its own
# becomes a failed row.
part() {
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( left < cap ? left : cap ))
    if (( limit < 15 )); then
        row "$name" skipped "the time budget (${BUDGET}s) is spent"
        return 0
    fi
    echo "== $name (up to ${limit}s): $*" | tee -a "$LOG" >&2
    local before rc
    before=$(wc -l < "$ROWS")
    timeout "$limit" "$@" > >(tee -a "$LOG" | grep '^{"part"' >> "$ROWS") 2>> "$LOG"
    rc=$?
    sleep 0.2  # let the output filter finish writing
    if (( rc == 124 )); then
        row "$name" failed "timed out after ${limit}s (see $LOG)"
    elif (( rc != 0 )) && (( $(wc -l < "$ROWS") == before )); then
        row "$name" failed "exit status $rc: $(grep -v '^\s*$' "$LOG" | tail -n 1 | cut -c1-200)"
    fi
    return 0
}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CUDA=1 TRAINER=gpu MODEL=r50 BATCH=128 WORKERS=6 FP16_STEPS=20 BENCH_ITERS=()
else  # fp16 on a CPU is emulated (slow); the bench's defaults there are too few steps to settle
    CUDA=0 TRAINER=cpu MODEL=tiny BATCH=16 WORKERS=0 FP16_STEPS=6 BENCH_ITERS=(--warmup 3 --iters 5)
fi

part versions 120 "$PY" bench/gpu_first.py versions

if (( CUDA )); then
    part "CUDA tests" 240 bash -c "out=\$('$PY' -m pytest -q -m cuda -p no:cacheprovider tests 2>&1); rc=\$?;
        echo \"\$out\" >&2; tally=\$(echo \"\$out\" | tail -n 1);
        '$PY' bench/gpu_first.py row 'CUDA tests' \$( ((rc == 0)) && echo ok || echo failed ) \"\$tally\"; exit \$rc"
else
    row "CUDA tests" skipped "no CUDA"
fi

part classifier 200 "$PY" bench/gpu_first.py classifier

if (( CUDA )); then
    part "nccl (1 rank)" 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 bench/gpu_first.py nccl
else
    part "nccl (1 rank)" 30 "$PY" bench/gpu_first.py nccl
fi

part "shared device" 150 "$PY" bench/gpu_first.py shared-gpu

# The trainer: the bench's step, then the run it is compared with (same model, batch, classes).
DATA=(data.synthetic.num_identities=64 data.synthetic.images_per_identity=16 data.synthetic.family_size=4
      data.synthetic.num_heldout_identities=16 data.synthetic.num_pairs=200 "data.num_workers=$WORKERS")
RUN=("trainer=$TRAINER" "model=$MODEL" "data.batch_size=$BATCH" "${DATA[@]}" trainer.max_steps=40
     trainer.checkpoint_every=20 trainer.log_every=10 trainer.val_every=0 "data.val_bins=[]"
     trainer.progress_bar=false "output_root=$OUT/train")
export PFC_DATA_CACHE="$OUT/data"
rm -rf "$OUT/train"
part "bench/train_step.py" 150 bash -c "'$PY' bench/train_step.py --model $MODEL --batch $BATCH --classes 64 \
    ${BENCH_ITERS[*]} trainer=$TRAINER > '$OUT/bench.json'"
part "40 steps, checkpoint, resume" 150 "$PY" launch/train.py "${RUN[@]}" run_name=leg trainer.stop_at=20
part "40 steps, checkpoint, resume" 150 "$PY" launch/train.py "${RUN[@]}" run_name=leg
part "fp16 leg" 150 "$PY" launch/train.py "${RUN[@]}" run_name=fp16 trainer.precision=fp16 \
    "trainer.max_steps=$FP16_STEPS"
part "trainer" 30 "$PY" bench/gpu_first.py trainer "$OUT/train/leg" "$OUT/train/fp16" "$OUT/bench.json"

echo
echo "## bench/gpu_first.sh on $(hostname), $(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - START ))s"
"$PY" bench/gpu_first.py table "$ROWS" | tee "$OUT/table.md"
