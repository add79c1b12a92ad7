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
#   VITSCALE_SOCKET_IFNAME   network interface(s) the ranks talk over, e.g. ib0 or eth1,eth2: sets
#                            GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (exact names) unless those
#                            are set. Needed when this node's hostname resolves to a loopback
#                            address (Debian's 127.0.1.1): gloo advertises that address otherwise
#   VITSCALE_LOG_DIR         per-rank stdout/stderr files (torchrun --log-dir), also shown here
#   VITSCALE_PYTHON          interpreter (default: the repository's .venv, else python3)
#   VITSCALE_STOPPED_EXIT_CODE  exit status when the ranks stopped on request after saving (75)
#
# SIGUSR1 and SIGTERM sent to this script (or by Slurm to every process of the step: scancel, the
# time limit) go to every training process, which agree on a step, save a checkpoint and exit 75
# (SIGUSR1 also requeues the Slurm job); a signal that comes during start-up is held until the
# ranks can take it. torchrun itself ignores both: it would stop the workers before they save. Each rank runs under this script's
# --rank mode, which relays signals and reports 75 to torchrun as success, because torchrun
# SIGTERMs every other rank as soon as one exits non-zero: a peer still saving or requeueing.
set -euo pipefail

EXIT_STOPPED=75  # vitscale/engine/faults.py: stopped on request after saving a checkpoint

catches_stop_signals() {
  # True once process $1 has handlers for SIGUSR1 (10) and SIGTERM (15): /proc's SigCgt mask.
  local key value mask=""
  [ -r "/proc/$1/status" ] || return 1
  while read -r key value; do
    if [ "$key" = "SigCgt:" ]; then mask=$value; fi
  done <"/proc/$1/status" 2>/dev/null
  [[ $mask =~ ^[0-9a-fA-F]+$ ]] || return 1
  (( (16#$mask >> 9) & 1 && (16#$mask >> 14) & 1 ))
}

remove_target_file() {
  # Rank 0 notes its Prometheus file_sd target file in VITSCALE_TARGET_RECORD; it goes when the
  # job does, however the training process ended (a killed rank 0 cannot remove it itself).
  local target
  [ -n "${VITSCALE_TARGET_RECORD:-}" ] && [ -f "$VITSCALE_TARGET_RECORD" ] || return 0
  target=$(<"$VITSCALE_TARGET_RECORD")
  [[ $target == *.json ]] && rm -f -- "$target"
  rm -f -- "$VITSCALE_TARGET_RECORD"
}

run_rank() {
  # torchrun's worker: `torchrun.sh --rank PYTHON train.py ARGS...`. The training process starts
  # with SIGUSR1/SIGTERM ignored and installs its handlers at its first line; a signal that comes
  # before that is held here and delivered once the process catches it, so none is lost or fatal.
  local child="" code=0 pending=""
  deliver() {
    [ -n "$child" ] && [ -n "$pending" ] && catches_stop_signals "$child" || return 0
    local signal
    for signal in $pending; do kill -s "$signal" "$child" 2>/dev/null || true; done
    pending=""
  }
  trap 'pending+=" USR1"; deliver' USR1
  trap 'pending+=" TERM"; deliver' TERM
  ( trap '' USR1 TERM; exec "$@" ) &
  child=$!
  while kill -0 "$child" 2>/dev/null; do
    if [ -n "$pending" ]; then
      deliver
      sleep 0.1
    else
      wait "$child" || true
    fi
  done
  wait "$child" || code=$?
  remove_target_file
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

if [ -n "${VITSCALE_SOCKET_IFNAME:-}" ]; then
  IFS=, read -r -a interfaces <<<"$VITSCALE_SOCKET_IFNAME"
  for interface in "${interfaces[@]}"; do
    [[ $interface =~ ^[A-Za-z0-9._@-]+$ ]] && [ -e "/sys/class/net/$interface" ] \
      || die "VITSCALE_SOCKET_IFNAME: no network interface '$interface' on $(hostname) (it has: $(ls /sys/class/net | tr '\n' ' '))"
  done
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$VITSCALE_SOCKET_IFNAME}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-=$VITSCALE_SOCKET_IFNAME}  # '=': exact names, not prefixes
fi

# torchrun, made deaf to SIGUSR1 and SIGTERM: Slurm signals every process of a job step (scancel,
# the time limit, pre-emption), and torchrun would die of USR1 or, on TERM, stop its workers
# before they save. The workers get each signal themselves (and through this script); torchrun
# ends when they do. Its children get the default handlers back on exec.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
# A failed rank makes torchrun raise ChildFailedError: its table of ranks and exit codes is shown,
# not a traceback of torchrun itself under the ranks' own one-line reasons.
# The handlers come first: importing torch takes seconds, and a signal then must not be fatal.
torchrun_deaf_to_stops='import runpy, signal, sys
for stop in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(stop, lambda signum, frame: None)
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
sys.argv[0] = "torchrun"
try:
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
except ChildFailedError as failure:
    print(failure, file=sys.stderr)
    sys.exit(1)'
launcher=("$python" -c "$torchrun_deaf_to_stops" --nnodes "$nnodes" --nproc-per-node "$nproc" --max-restarts 0)
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
  # Merged logs of several nodes need the host in the prefix: "[node07:12] ...", not "[default4]".
  # shellcheck disable=SC2016  # torchrun fills in ${hostname} and ${rank} itself
  launcher+=(--log-dir "$VITSCALE_LOG_DIR" --tee 3 --log-line-prefix-template '[${hostname}:${rank}] ')
fi

stopped_exit_code=${VITSCALE_STOPPED_EXIT_CODE:-$EXIT_STOPPED}
require_whole_number VITSCALE_STOPPED_EXIT_CODE "$stopped_exit_code"
# Each rank's exit status, one file per rank: beside the logs when there are logs (a killed job
# leaves them where they are useful), else in a temp dir removed at exit.
if [ -n "${VITSCALE_LOG_DIR:-}" ]; then
  VITSCALE_RANK_STATUS_DIR=$VITSCALE_LOG_DIR/exit_codes/$(hostname)
  mkdir -p -- "$VITSCALE_RANK_STATUS_DIR"
  rm -f -- "$VITSCALE_RANK_STATUS_DIR"/rank*
  trap 'remove_target_file' EXIT
else
  VITSCALE_RANK_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vitscale-ranks.XXXXXX")
  trap 'remove_target_file; rm -rf -- "$VITSCALE_RANK_STATUS_DIR"' EXIT
fi
export VITSCALE_RANK_STATUS_DIR VITSCALE_TARGET_RECORD=$VITSCALE_RANK_STATUS_DIR/target_file

echo "launch/torchrun.sh: $(hostname): $nproc process(es) x $nnodes node(s), $( [ "$gpus" = 0 ] && echo CPU || echo "$gpus GPU(s)" )"
torchrun_pid=""
pending=""
forward_to_workers() {
  # To the --rank wrappers (they relay to the ranks) once all of them are up and trapping; until
  # then the signal waits here (one that came before torchrun started its workers included).
  local signal pid pids count=0
  [ -n "$pending" ] && [ -n "$torchrun_pid" ] || return 0
  pids=$(child_pids "$torchrun_pid")
  for pid in $pids; do
    catches_stop_signals "$pid" || return 0
    count=$((count + 1))
  done
  [ "$count" = "$nproc" ] || return 0
  for signal in $pending; do
    echo "launch/torchrun.sh: SIG$signal -> training processes" >&2
    # shellcheck disable=SC2086  # PIDs from /proc: digits only
    kill -s "$signal" $pids 2>/dev/null || true
  done
  pending=""
}
trap 'pending+=" USR1"; forward_to_workers' USR1
trap 'pending+=" TERM"; forward_to_workers' TERM
"${launcher[@]}" --no-python "$repo/launch/torchrun.sh" --rank "$python" "$repo/vitscale/train.py" "$@" &
torchrun_pid=$!

# `wait` returns early whenever a trapped signal arrives; keep waiting until torchrun is gone.
while kill -0 "$torchrun_pid" 2>/dev/null; do
  if [ -n "$pending" ]; then
    forward_to_workers
    sleep 0.1
  else
    wait "$torchrun_pid" || true
  fi
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
