#!/usr/bin/env bash
# launch/torchrun.sh --config configs/vit_b16_i21k.yaml 'data.train_shards=/data/i21k/train-{000000..004095}.tar
#
#' One node, any number of GPUs: torchrun starts one training process (vitscale/train.py) per GPU,
# or VITSCALE_NPROC_PER_NODE CPU processes (gloo) on a machine without GPUs. Arguments go to
# vitscale/train.py unchanged (--config, --ds_config, dotted KEY=VALUE overrides).
# launch/pretrain_vit_h14.sh runs this script once per node under srun for multi-node jobs.
#
# Environment (all optional):
#   VITSCALE_NPROC_PER_NODE  processes on this node (default: the visible GPUs; 1 without GPUs)
#   VITSCALE_NNODES          nodes in the job (default 1: standalone rendezvous on a free port)
#   VITSCALE_RDZV_ENDPOINT   host:port of the c10d rendezvous (multi-node; the first node)
#   VITSCALE_RDZV_ID         rendezvous id, the same on every node (e.g. the Slurm job id)
#   VITSCALE_LOG_DIR         per-rank stdout/stderr files (torchrun --log-dir), also shown here
#   VITSCALE_PYTHON          interpreter (default: the repository's .venv, else python3)
#   VITSCALE_STOPPED_EXIT_CODE  exit status when the ranks stopped on request after saving (75)
#
# SIGUSR1 and SIGTERM sent to this script go to every training process, which agree on a step,
# save a checkpoint and exit 75 (SIGUSR1 also requeues the Slurm job). torchrun itself is not
# signalled: it would stop the workers before they save. Each rank runs under this script's
# --rank mode, which relays signals and reports 75 to torchrun as success, because torchrun
# SIGTERMs every other rank as soon as one exits non-zero: a peer still saving or requeueing.
set -euo pipefail

EXIT_STOPPED=75  # vitscale/engine/faults.py: stopped on request after saving a checkpoint

run_rank() {
  # torchrun's worker: `torchrun.sh --rank PYTHON train.py ARGS...`.
  local child="" code=0
  trap '[ -n "$child" ] && kill -s USR1 "$child" 2>/dev/null || true' USR1
  trap '[ -n "$child" ] && kill -s TERM "$child" 2>/dev/null || true' TERM
  "$@" &
  child=$!
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true
  done
  wait "$child" || code=$?
  if [ -n "${VITSCALE_RANK_STATUS_DIR:-}" ] && [[ ${RANK:-0} =~ ^[0-9]+$ ]]; then
    echo "$code" >"$VITSCALE_RANK_STATUS_DIR/rank${RANK:-0}"
  fi
  [ "$code" = "$EXIT_STOPPED" ] && exit 0
  exit "$code"
}

if [ "${1:-}" = "--rank" ]; then
  shift
  run_rank "$@"
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
  echo "launch/torchrun.sh: $*" >&2
  exit 2
}

require_whole_number() {
  # Checked before any arithmetic: bash evaluates a variable's text inside $(( )) as code.
  local name=$1 value=$2
  [[ $value =~ ^[0-9]+$ ]] || die "$name must be a whole number, got '$value'"
}

visible_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    local devices=${CUDA_VISIBLE_DEVICES//[[:space:]]/}
    [ -z "$devices" ] && { echo 0; return; }
    local -a list
    IFS=, read -r -a list <<<"$devices"
    echo "${#list[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

child_pids() {
  # Children of PID $1 from /proc (no procps needed); the command name may hold spaces or ')'.
  local parent=$1 stat line fields ppid
  for stat in /proc/[0-9]*/stat; do
    read -r line <"$stat" 2>/dev/null || continue
    fields=${line##*) }
    read -r _ ppid _ <<<"$fields"
    if [ "$ppid" = "$parent" ]; then
      line=${stat#/proc/}
      echo "${line%/stat}"
    fi
  done
}

python=${VITSCALE_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

gpus=$(visible_gpus)
require_whole_number "visible GPU count" "$gpus"
if [ "$gpus" = 0 ]; then
  nproc=${VITSCALE_NPROC_PER_NODE:-1}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
else
  nproc=${VITSCALE_NPROC_PER_NODE:-$gpus}
fi
nnodes=${VITSCALE_NNODES:-1}
require_whole_number VITSCALE_NPROC_PER_NODE "$nproc"
require_whole_number VITSCALE_NNODES "$nnodes"
[ "$nproc" -ge 1 ] || die "VITSCALE_NPROC_PER_NODE must be at least 1"

# torchrun, made deaf to SIGUSR1: Slurm signals every process of a job step, and torchrun would
# die of it (default action) before its workers save. Its children get the default back on exec.
torchrun_ignoring_usr1='import runpy, signal, sys
signal.signal(signal.SIGUSR1, lambda signum, frame: None)
sys.argv[0] = "torchrun"
runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)'
launcher=("$python" -c "$torchrun_ignoring_usr1" --nnodes "$nnodes" --nproc-per-node "$nproc" --max-restarts 0)
if [ -n "${VITSCALE_RDZV_ENDPOINT:-}" ]; then
  [[ $VITSCALE_RDZV_ENDPOINT =~ ^[A-Za-z0-9._-]+:[0-9]+$ ]] \
    || die "VITSCALE_RDZV_ENDPOINT must be host:port, got '$VITSCALE_RDZV_ENDPOINT'"
  launcher+=(--rdzv-backend c10d --rdzv-endpoint "$VITSCALE_RDZV_ENDPOINT" --rdzv-id "${VITSCALE_RDZV_ID:-vitscale}")
elif [ "$nnodes" = 1 ]; then
  launcher+=(--standalone)
else
  die "VITSCALE_NNODES=$nnodes needs VITSCALE_RDZV_ENDPOINT=host:port of the first node"
fi
if [ -n "${VITSCALE_LOG_DIR:-}" ]; then
  mkdir -p -- "$VITSCALE_LOG_DIR"
  launcher+=(--log-dir "$VITSCALE_LOG_DIR" --tee 3)
fi

stopped_exit_code=${VITSCALE_STOPPED_EXIT_CODE:-$EXIT_STOPPED}
require_whole_number VITSCALE_STOPPED_EXIT_CODE "$stopped_exit_code"
# Each rank's exit status, one file per rank: beside the logs when there are logs (a killed job
# leaves them where they are useful), else in a temp dir removed at exit.
if [ -n "${VITSCALE_LOG_DIR:-}" ]; then
  VITSCALE_RANK_STATUS_DIR=$VITSCALE_LOG_DIR/exit_codes/$(hostname)
  mkdir -p -- "$VITSCALE_RANK_STATUS_DIR"
  rm -f -- "$VITSCALE_RANK_STATUS_DIR"/rank*
else
  VITSCALE_RANK_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vitscale-ranks.XXXXXX")
  trap 'rm -rf -- "$VITSCALE_RANK_STATUS_DIR"' EXIT
fi
export VITSCALE_RANK_STATUS_DIR

echo "launch/torchrun.sh: $(hostname): $nproc process(es) x $nnodes node(s), $( [ "$gpus" = 0 ] && echo CPU || echo "$gpus GPU(s)" )"
torchrun_pid=""
forward_to_workers() {
  local signal=$1 pids
  [ -n "$torchrun_pid" ] || return 0
  pids=$(child_pids "$torchrun_pid")  # the --rank wrappers; they relay to the ranks
  echo "launch/torchrun.sh: SIG$signal -> training processes" >&2
  # shellcheck disable=SC2086  # PIDs from /proc: digits only
  [ -n "$pids" ] && kill -s "$signal" $pids 2>/dev/null || true
}
trap 'forward_to_workers USR1' USR1
trap 'forward_to_workers TERM' TERM
"${launcher[@]}" --no-python "$repo/launch/torchrun.sh" --rank "$python" "$repo/vitscale/train.py" "$@" &
torchrun_pid=$!

# `wait` returns early whenever a trapped signal arrives; keep waiting until torchrun is gone.
while kill -0 "$torchrun_pid" 2>/dev/null; do
  wait "$torchrun_pid" || true
done
status=0
wait "$torchrun_pid" || status=$?
# The ranks' own exit codes say more than torchrun's 0/1: 75 stopped after saving, 2 bad input,
# 3 too many non-finite steps, 4 hung (vitscale/engine/faults.py).
codes=" "
for file in "$VITSCALE_RANK_STATUS_DIR"/rank*; do
  [ -f "$file" ] && codes+="$(<"$file") "
done
for code in $codes; do
  if [ "$code" != 0 ] && [ "$code" != "$EXIT_STOPPED" ]; then
    echo "launch/torchrun.sh: a training process exited with status $code" >&2
    exit "$code"
  fi
done
if [ "$status" = 0 ] && [[ $codes == *" $EXIT_STOPPED "* ]]; then
  echo "launch/torchrun.sh: training stopped on request after saving a checkpoint" >&2
  exit "$stopped_exit_code"
fi
exit "$status"
