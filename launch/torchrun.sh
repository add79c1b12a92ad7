#!/usr/bin/env bash
# launch/torchrun.sh --config configs/vit_b16_i21k.yaml data.train_shards=/data/i21k/train-{000000..004095}.tar
#
# One node, any number of GPUs: torchrun starts one training process (vitscale/train.py) per GPU,
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
#
# SIGUSR1 and SIGTERM sent to this script go straight to every training process, which agree on
# a step, save a checkpoint and exit (SIGUSR1 also requeues the Slurm job). torchrun itself is
# not signalled: it would stop the workers before they save.
set -euo pipefail

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

launcher=("$python" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc" --max-restarts 0)
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

echo "launch/torchrun.sh: $(hostname): $nproc process(es) x $nnodes node(s), $( [ "$gpus" = 0 ] && echo CPU || echo "$gpus GPU(s)" )"
"${launcher[@]}" "$repo/vitscale/train.py" "$@" &
torchrun_pid=$!

forward_to_workers() {
  local signal=$1 pids
  pids=$(child_pids "$torchrun_pid")
  echo "launch/torchrun.sh: SIG$signal -> training processes ${pids//$'\n'/ }" >&2
  # shellcheck disable=SC2086  # PIDs from /proc: digits only
  [ -n "$pids" ] && kill -s "$signal" $pids 2>/dev/null || true
}
trap 'forward_to_workers USR1' USR1
trap 'forward_to_workers TERM' TERM

# `wait` returns early whenever a trapped signal arrives; keep waiting until torchrun is gone.
while kill -0 "$torchrun_pid" 2>/dev/null; do
  wait "$torchrun_pid" || true
done
status=0
wait "$torchrun_pid" || status=$?
exit "$status"
