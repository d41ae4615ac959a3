# Requeue before the time limit; sourced by train.sbatch (and by tests/cluster).
#
# train.sbatch asks for `--signal=B:USR1@180`: 180 s before the time limit Slurm sends SIGUSR1 to
# the batch shell only (B:), not to the training processes. The handler asks Slurm to put the job
# back in the queue (`scontrol requeue`); Slurm then ends the running step and later starts this
# script again under the same job id. The run directory is deterministic
# (${output_root}/${run_name}) and torchrun_cmd.sh passes trainer.resume=auto, so the new start
# continues from the newest complete checkpoint; work since that checkpoint is redone.
#
# Preemption: with PreemptMode=REQUEUE Slurm requeues a preempted `--requeue` job by itself (it
# sends SIGTERM, waits GraceTime, kills, requeues). If the cluster sets
# SlurmctldParameters=preempt_send_user_signal, the USR1 also arrives on preemption and this
# handler's requeue is then redundant and harmless. SIGTERM is deliberately not trapped:
# `scancel` sends it too, and a cancelled job must stay cancelled.
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

# Call pfc_requeue when the batch shell receives SIGUSR1.
pfc_install_requeue_trap() {
    PFC_REQUEUED=0
    trap 'pfc_requeue SIGUSR1' USR1
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
