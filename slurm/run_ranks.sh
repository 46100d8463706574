#!/usr/bin/env bash
# Inside a Slurm allocation: start one srun task per rank of an hdpo_ds entry point, relay the time-limit
# warning to the ranks, and requeue the job when they stopped on it. The sbatch scripts end with
#   exec bash "$SLURM_SUBMIT_DIR/slurm/run_ranks.sh" launch/train.py "$@"
# (exec keeps the batch shell's pid, which is what `--signal=B:USR1@...` signals.) docs/slurm.md has more.
#
# Ranks: srun starts the allocation's tasks (--nodes x --ntasks-per-node); each maps SLURM_PROCID,
# SLURM_LOCALID and SLURM_STEP_NUM_TASKS to RANK, LOCAL_RANK and WORLD_SIZE (hdpo_ds/runtime/dist.py). The master
# is the job's first node, its address asked from Slurm (`scontrol show node`, NodeAddr), never guessed
# from DNS; the port is a free one on that node (this script runs there).
#
# Signals: SIGUSR1 to this shell (Slurm's warning ahead of the time limit, or `scancel --signal=USR1
# --batch <job>`) is forwarded to srun, which passes it to every rank; the ranks agree on a step, finish
# it, checkpoint and exit 75 (hdpo_ds.runtime.stop.EXIT_STOPPED). Then this script calls `scontrol requeue`, and
# the requeued job resumes from `latest` (train.resume: auto). SIGTERM (scancel, scontrol requeue,
# preemption) reaches the ranks from Slurm directly: they checkpoint within KillWait if they can, and
# the job is not requeued from here.
#
# Environment (optional; variables set before sbatch reach the job, as sbatch exports them by default):
#   HDPO_PYTHON     interpreter of the ranks; default $HDPO_REPO/.venv/bin/python if present, else python3
#   HDPO_REPO       the repository; default $SLURM_SUBMIT_DIR (submit from the repository root)
#   HDPO_DEVICE     gpu | cpu | auto (default): gpu when nvidia-smi lists a GPU on this node. cpu runs
#                   DeepSpeed's CPU accelerator over gloo, --ntasks-per-node ranks per node
#   HDPO_MASTER_PORT  rendezvous port (default: a free port picked here)
#   HDPO_SRUN_ARGS  extra srun options, split on spaces (e.g. "--cpu-bind=cores")
#   OMP_NUM_THREADS default: --cpus-per-task, else 1
set -uo pipefail

log() { echo "[$(date -u +%FT%TZ) run_ranks] $*"; }
die() {
  echo "[run_ranks] error: $*" >&2
  exit 2
}

[[ -n "${SLURM_JOB_ID:-}" ]] || die "run inside a Slurm allocation (sbatch or salloc)"
[[ $# -ge 1 ]] || die "usage: run_ranks.sh ENTRY_POINT.py [args ...]"
repo=${HDPO_REPO:-${SLURM_SUBMIT_DIR:-}}
entry=$1
shift
[[ "$entry" = /* ]] || entry="$repo/$entry"
[[ -f "$entry" ]] || die "$entry not found: submit from the repository root (sbatch slurm/train.sbatch ...) or set HDPO_REPO"
if [[ -n "${HDPO_PYTHON:-}" ]]; then
  python=$HDPO_PYTHON
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python=python3
fi
command -v "$python" >/dev/null 2>&1 || die "HDPO_PYTHON=$python is not an executable"

device=${HDPO_DEVICE:-auto}
if [[ "$device" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    device=gpu
  else
    device=cpu
  fi
fi
case "$device" in
  gpu) ;;
  cpu) export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" ;;
  *) die "HDPO_DEVICE=$device: expected gpu, cpu or auto" ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The submitting shell's environment comes along (sbatch --export=ALL): drop its rank variables, or a
# launcher's leftovers would override the mapping from Slurm's.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$first_node" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
[[ -n "$MASTER_ADDR" ]] || die "no NodeAddr for $first_node in 'scontrol show node'"
if [[ -n "${SLURMD_NODENAME:-}" && "$SLURMD_NODENAME" != "$first_node" ]]; then
  log "warning: this batch shell runs on $SLURMD_NODENAME, not on the first node $first_node; set HDPO_MASTER_PORT to a port free there"
fi
MASTER_PORT=${HDPO_MASTER_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export MASTER_ADDR MASTER_PORT

# Rank 0 notes a stop here (hdpo_ds/runtime/stop.py); a requeued job has the same id, so clear it first.
mkdir -p "$repo/slurm/logs"
export HDPO_STOP_MARKER="$repo/slurm/logs/stop-${SLURM_CLUSTER_NAME:-cluster}-$SLURM_JOB_ID.json"
rm -f "$HDPO_STOP_MARKER"

# Not --kill-on-bad-exit: ranks that stop on a signal all exit 75 at nearly the same moment, and it
# would kill the slower ones in their exit. --wait still ends the step 60 s after a first rank ended
# (a crashed rank's peers may otherwise wait in a collective until its timeout).
srun_args=(--kill-on-bad-exit=0 --wait=60)
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# shellcheck disable=SC2206 # split on purpose
[[ -n "${HDPO_SRUN_ARGS:-}" ]] && srun_args+=($HDPO_SRUN_ARGS)

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: ${SLURM_NTASKS:-?} ranks," \
  "${SLURM_TASKS_PER_NODE:-?} per node, device $device, master $first_node $MASTER_ADDR:$MASTER_PORT"
log "$python $entry $*"

got_usr1=0
signalled=0
srun_pid=
on_usr1() {
  got_usr1=1
  signalled=1
  log "SIGUSR1: relaying it to the ranks (training checkpoints after its current step and stops)"
  [[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null
}
on_term() {
  signalled=1
  log "SIGTERM: the job is being cancelled or requeued; the ranks checkpoint if they can"
}
trap on_usr1 USR1
trap on_term TERM

srun "${srun_args[@]}" "$python" -u "$entry" "$@" &
srun_pid=$!
((got_usr1)) && kill -USR1 "$srun_pid" 2>/dev/null # the signal came while srun was starting
# `wait` returns early whenever a trapped signal arrives; wait again until srun itself has ended.
while :; do
  signalled=0
  wait "$srun_pid"
  rc=$?
  ((signalled)) || break
done

if [[ -s "$HDPO_STOP_MARKER" ]]; then
  log "the ranks stopped: $(tr -d '\n' <"$HDPO_STOP_MARKER" | tr -s ' ')"
fi
if ((got_usr1)) && ((rc != 0)); then
  log "srun ended with $rc after SIGUSR1: requeueing job $SLURM_JOB_ID; it resumes where it stopped"
  scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: resubmit the same command to resume"
fi
log "srun ended with $rc"
exit "$rc"
