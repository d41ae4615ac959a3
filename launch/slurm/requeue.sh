# Requeue before the time limit; sourced by train.sbatch (and by tests/cluster).
#
# train.sbatch asks for `--signal=B:USR1@180`: 180 s before the time limit Slurm sends SIGUSR1 to
# the batch shell only (B:), not to the training processes. The handler then asks the training to
# checkpoint and stop: it creates the stop file PFC_STOP_FILE, which every rank looks for
# (trainer.stop_file; at most every trainer.stop_poll_s seconds); the ranks agree on the step,
# write its checkpoint, remove the file, leave "<stop file>.stopped" and exit. Once the step has
# ended that way (or failed), the job is put back in the queue (`scontrol requeue`) and Slurm later
# starts this script again under the same job id; a run that finished meanwhile is not requeued.
# The run directory is deterministic (${output_root}/${run_name}) and torchrun_cmd.sh passes
# trainer.resume=auto, so the new start continues from that checkpoint: nothing is redone. If the
# step has not ended PFC_STOP_GRACE seconds (default 150) after the signal, the job is requeued
# anyway (Slurm then stops the step; work since the last checkpoint is redone). Without
# PFC_STOP_FILE the job is requeued at once.
#
# Preemption: with PreemptMode=REQUEUE Slurm requeues a preempted `--requeue` job by itself. It
# sends SIGTERM (and SIGCONT) to every process of the job when the partition's GraceTime starts,
# and SIGKILL when it ends. This shell does not trap SIGTERM (`scancel` sends it too, and a
# cancelled job must stay cancelled); the ranks checkpoint on it only with
# trainer.stop_signal=SIGTERM (launch/slurm/README.md), otherwise the work since the last
# checkpoint is redone after the requeue.
#
# bash runs a trap only between commands, never while a foreground command runs, so the step is
# started in the background and the shell waits for it: `wait` returns early when a trapped signal
# arrives, the handler runs, and pfc_run_step goes back to waiting.

# Requeue this job unless it was already requeued PFC_MAX_REQUEUES times (default 20).
# $1: what triggered it, for the log.
pfc_requeue() {
    local reason="${1:-signal}"
    local job="${SLURM_JOB_ID:-}"
    local count="${SLURM_RESTART_COUNT:-0}"
    local max="${PFC_MAX_REQUEUES:-20}"
    local now
    now="$(date '+%F %T')"
    if [[ -z "$job" ]]; then
        echo "[pfc $now] $reason: no SLURM_JOB_ID, nothing to requeue" >&2
        return 0
    fi
    if (( count >= max )); then
        echo "[pfc $now] $reason: job $job was requeued $count times (PFC_MAX_REQUEUES=$max); not requeueing" >&2
        return 0
    fi
    echo "[pfc $now] $reason: requeueing job $job (restart $((count + 1)) of at most $max)" >&2
    PFC_REQUEUED=1
    if ! scontrol requeue "$job"; then
        echo "[pfc $now] scontrol requeue $job failed (is requeue allowed on this partition?)" >&2
    fi
}

# SIGUSR1 asks the training to checkpoint and stop (pfc_request_stop); SIGUSR2 is the stop
# request's deadline (sent by its watchdog). Call pfc_after_step when the step has ended.
pfc_install_requeue_trap() {
    PFC_REQUEUED=0
    PFC_STOP_REQUESTED=0
    PFC_STOP_WATCHDOG=
    trap 'pfc_request_stop SIGUSR1' USR1
    trap 'pfc_requeue "no checkpoint-and-stop within ${PFC_STOP_GRACE:-150} s"' USR2
}

# Create the stop file and start the deadline watchdog (once); without PFC_STOP_FILE, requeue now.
pfc_request_stop() {
    local reason="${1:-signal}"
    if [[ -z "${PFC_STOP_FILE:-}" ]]; then
        pfc_requeue "$reason"
        return 0
    fi
    if (( PFC_STOP_REQUESTED )); then
        return 0
    fi
    PFC_STOP_REQUESTED=1
    local grace="${PFC_STOP_GRACE:-150}"
    if ! { mkdir -p "$(dirname "$PFC_STOP_FILE")" && : > "$PFC_STOP_FILE"; }; then
        echo "[pfc $(date '+%F %T')] $reason: cannot create the stop file $PFC_STOP_FILE" >&2
        pfc_requeue "$reason"
        return 0
    fi
    echo "[pfc $(date '+%F %T')] $reason: asked the training to checkpoint and stop ($PFC_STOP_FILE);" \
         "requeueing when the step ends, or in $grace s" >&2
    # The watchdog: a TERM ends its sleep too (no orphan keeps this script's output open).
    ( trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
      sleep "$grace" & sleeper=$!
      wait "$sleeper" && kill -USR2 "$$" ) &
    PFC_STOP_WATCHDOG=$!
}

# After the step ($1: its exit status): stop the watchdog; requeue when the training stopped
# unfinished at a stop request (it leaves "<stop file>.stopped"), whoever asked: this shell's
# SIGUSR1, or a signal Slurm sent every process of the step (`scancel --signal=USR1 <job>`,
# trainer.stop_signal=SIGTERM at preemption); after this shell's request, also when the step
# failed, not when the run simply finished. Remove the stop file (a request never seen must not
# stop the next start).
pfc_after_step() {
    local rc="${1:-0}"
    if [[ -n "${PFC_STOP_WATCHDOG:-}" ]]; then
        kill "$PFC_STOP_WATCHDOG" 2>/dev/null || true
        wait "$PFC_STOP_WATCHDOG" 2>/dev/null || true
        PFC_STOP_WATCHDOG=
    fi
    if (( ! PFC_REQUEUED )); then
        if [[ -n "${PFC_STOP_FILE:-}" && -e "$PFC_STOP_FILE.stopped" ]]; then
            pfc_requeue "the training stopped at the checkpoint of step $(head -c 20 "$PFC_STOP_FILE.stopped" | tr -d '\n')"
        elif (( PFC_STOP_REQUESTED && rc != 0 )); then
            pfc_requeue "the step ended with status $rc after the stop request"
        elif (( PFC_STOP_REQUESTED )); then
            echo "[pfc $(date '+%F %T')] the training finished before it acted on the stop request; not requeueing" >&2
        fi
    fi
    if [[ -n "${PFC_STOP_FILE:-}" ]]; then
        rm -f "$PFC_STOP_FILE" "$PFC_STOP_FILE.stopped"
    fi
}

# Run "$@" in the background and wait for it while traps can fire; returns its exit status.
pfc_run_step() {
    "$@" &
    local pid=$!
    local rc=0
    while :; do
        rc=0
        wait "$pid" || rc=$?
        # Above 128 with the child still alive: the wait was cut short by a trapped signal.
        if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        break
    done
    if (( rc > 128 )); then
        # The child may have ended while the handler ran; bash keeps its status for a later wait.
        rc=0
        wait "$pid" 2>/dev/null || rc=$?
        (( rc == 127 )) && rc=143  # status lost: report the child as terminated
    fi
    return "$rc"
}
