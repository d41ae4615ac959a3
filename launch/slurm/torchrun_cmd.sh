#!/usr/bin/env bash
# The torchrun agent of one node. train.sbatch starts one copy per node through srun; you can
# run it by hand on each node too. Every multi-node launch of this project goes through this
# file, so the sbatch script, the README and the tests run the same command line.
#
# All agents meet at a c10d rendezvous hosted by node 0 (PFC_RDZV_HOST:PFC_RDZV_PORT); the
# rendezvous then assigns the global ranks, so no node needs to know its rank in advance.
#
# Environment (train.sbatch sets what Slurm knows; defaults in brackets):
#   PFC_RDZV_HOST       host of the rendezvous, reachable from every node   [required]
#   PFC_RDZV_PORT       its TCP port                                        [29400]
#   PFC_RDZV_ID         id shared by the agents of one job                  [SLURM_JOB_ID, else pfc]
#   PFC_NODE_RANK       this node's index; node 0 hosts the rendezvous store [SLURM_NODEID, else 0]
#   PFC_NNODES          nodes, or min:max for an elastic job                [SLURM_JOB_NUM_NODES, else 1]
#   PFC_NPROC_PER_NODE  workers per node                     [SLURM_GPUS_ON_NODE when > 0, else 1]
#   PFC_STOP_SIGNAL     the signal that asks the ranks to checkpoint and stop (trainer.stop_signal;
#                       a trainer.stop_signal=... argument wins; null: none)  [SIGUSR1]
#   PFC_MAX_RESTARTS    times torchrun restarts a failed worker group       [0; elastic: 3]
#   PFC_JOIN_TIMEOUT    seconds the rendezvous waits for all nodes          [900]
#   PFC_LAST_CALL_TIMEOUT  elastic: seconds it waits past MIN nodes for more  [unset: torch's 30]
#   PFC_LOCAL_ADDR      address other nodes reach this one by (--local-addr) [unset: its hostname]
#   PFC_TORCHRUN        the launcher command                                [torchrun]
#   PFC_DRY_RUN=1       print the command line instead of running it
# Arguments: Hydra overrides for launch/train.py. They follow `trainer.resume=auto`, so a later
# `trainer.resume=...` of yours wins (the last override of a key wins in Hydra).
set -euo pipefail

# The checkout this file belongs to (inside a container: the image's copy).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
train_py="$repo/launch/train.py"
if [[ ! -f "$train_py" ]]; then
    echo "torchrun_cmd.sh: $train_py not found" >&2
    exit 2
fi

rdzv_host="${PFC_RDZV_HOST:?torchrun_cmd.sh: set PFC_RDZV_HOST to the host of node 0}"
rdzv_port="${PFC_RDZV_PORT:-29400}"
rdzv_id="${PFC_RDZV_ID:-${SLURM_JOB_ID:-pfc}}"
node_rank="${PFC_NODE_RANK:-${SLURM_NODEID:-0}}"
nnodes="${PFC_NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
gpus="${SLURM_GPUS_ON_NODE:-0}"
nproc="${PFC_NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"

# Slurm signals every process of the step (scancel --signal, preemption, --signal without B:),
# this agent included. The agent must outlive the stop signal while the ranks checkpoint, so it
# ignores it (inherited across exec; torchrun's --signals-to-handle leaves it out, so torchrun
# does not take it over). The ranks install their own handler (trainer.stop_signal, passed below
# so agent and ranks agree), and their data workers ignore it (partial_fc/train/stop.py).
stop_signal="${PFC_STOP_SIGNAL:-SIGUSR1}"
handled="SIGTERM,SIGINT,SIGHUP,SIGQUIT"  # torchrun's default: shut the workers down and fail
for arg in "$@"; do
    case "$arg" in trainer.stop_signal=*) stop_signal="${arg#*=}" ;; esac
done
case "$stop_signal" in
    null|None|none|"") ;;
    SIG[A-Z]*[A-Z0-9])
        trap '' "${stop_signal#SIG}"
        handled="$(tr ',' '\n' <<< "$handled" | grep -vx "$stop_signal" | paste -sd, -)" ;;
    *)
        echo "torchrun_cmd.sh: the stop signal must be a name such as SIGUSR1 or null, got '$stop_signal'" >&2
        exit 2 ;;
esac

# Node 0 hosts the rendezvous TCP store; the others only connect. Saying so explicitly (instead
# of torchrun's guess from matching PFC_RDZV_HOST against local addresses) keeps it right when
# the host name resolves to another interface, and when all "nodes" share one machine (tests).
if [[ "$node_rank" == 0 ]]; then is_host=1; else is_host=0; fi

read -r -a launcher <<< "${PFC_TORCHRUN:-torchrun}"
rdzv_conf="is_host=$is_host,join_timeout=${PFC_JOIN_TIMEOUT:-900}"
max_restarts="${PFC_MAX_RESTARTS:-0}"

# Elastic membership (PFC_NNODES=MIN:MAX): a node that dies makes the others restart on fewer
# nodes (counted against PFC_MAX_RESTARTS), a node that arrives is admitted at a restart of the
# running ones (not counted). By default torch shares the rendezvous store with the workers; a
# node joining a running job then waits at that restart for a store address the agents that were
# there never publish again, until join_timeout (torch 2.13), so elastic jobs do not share it.
if [[ "$nnodes" == *:* ]]; then
    max_restarts="${PFC_MAX_RESTARTS:-3}"  # a lost node is a failed worker group: the others restart
    launcher=(env "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}" "${launcher[@]}")
    if [[ -n "${PFC_LAST_CALL_TIMEOUT:-}" ]]; then
        rdzv_conf+=",last_call_timeout=$PFC_LAST_CALL_TIMEOUT"
    fi
fi

cmd=(
    "${launcher[@]}"
    --nnodes="$nnodes"
    --nproc-per-node="$nproc"
    --rdzv-backend=c10d
    --rdzv-endpoint="$rdzv_host:$rdzv_port"
    --rdzv-id="$rdzv_id"
    --rdzv-conf="$rdzv_conf"
    --max-restarts="$max_restarts"
    --signals-to-handle="$handled"
)
if [[ -n "${PFC_LOCAL_ADDR:-}" ]]; then
    cmd+=(--local-addr="$PFC_LOCAL_ADDR")
fi
cmd+=("$train_py" trainer.resume=auto "trainer.stop_signal=$stop_signal" "$@")

if [[ "${PFC_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
echo "[pfc node $node_rank/$nnodes on $(hostname)] ${cmd[*]}" >&2
exec "${cmd[@]}"
