#!/usr/bin/env bash
# sbatch launch/pretrain_vit_h14.sh [KEY=VALUE ...]
#
# ViT-H/14 supervised pretraining on JFT-style shards (configs/vit_h14_jft.yaml), multi-node.
# Submit from the repository root on a filesystem every node sees. srun starts one launcher per
# node (launch/torchrun.sh: torchrun, c10d rendezvous on the first node of the allocation), which
# starts one training process per GPU. Requeued or resubmitted, the run resumes from its latest
# complete checkpoint in run.output_dir/run.name.
#
# What to change -- without editing this file:
#   sbatch options override the #SBATCH lines below:
#     sbatch --nodes=16 --time=72:00:00 --partition=gpu --account=me launch/pretrain_vit_h14.sh
#   a CPU-only try (what tests/test_slurm.py runs), no file edited:
#     VITSCALE_CONFIG=configs/vit_h14_jft_tiny.yaml VITSCALE_PROCS_PER_NODE=2 sbatch --nodes=1 \
#       --gpus-per-node=0 --cpus-per-task=2 --time=10 launch/pretrain_vit_h14.sh 'data.train_shards=DIR/train-{000000..000003}.tar' data.eval_shards=
#   arguments are dotted config overrides for vitscale/train.py:
#     sbatch launch/pretrain_vit_h14.sh 'data.train_shards=/data/jft/train-{000000..099999}.tar' optim.lr=3e-4
#   environment variables (exported at submission; Slurm passes them to the job):
#     VITSCALE_CONFIG             config file (default configs/vit_h14_jft.yaml)
#     VITSCALE_OVERRIDES          more overrides, whitespace-separated (never shell-evaluated)
#     VITSCALE_DS_CONFIG          DeepSpeed JSON passed as --ds_config (default: none, from the config tree)
#     VITSCALE_GPUS_PER_NODE      default: the GPUs Slurm allocated; 0 runs CPU processes (gloo)
#     VITSCALE_PROCS_PER_NODE     processes per node (default: one per GPU; 1 on CPU)
#     VITSCALE_MASTER_PORT        rendezvous port on the first node (default 20000 + job id % 12000)
#     VITSCALE_OUTPUT_DIR         run.output_dir (checkpoints, config, log.jsonl)
#     VITSCALE_LOG_DIR            per-rank logs (default logs/<job id>); restart N goes to restartN/
#     VITSCALE_METRICS_PORT       Prometheus /metrics base port (metrics.port; + local rank)
#     VITSCALE_METRICS_ADDRESS    bind address (metrics.address; 0.0.0.0 lets a remote Prometheus in)
#     VITSCALE_PROMETHEUS_TARGETS directory your Prometheus watches with file_sd (metrics.file_sd_dir)
#     VITSCALE_PYTHON             interpreter on the nodes (default: .venv/bin/python, else python3)
#     VITSCALE_SOCKET_IFNAME      the interface the nodes reach each other on (ib0, eth1): sets
#                                 GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME on every node
#     VITSCALE_ROOT               repository root (default: the submission directory)
#
# Pre-emption: --signal=B:USR1@300 makes Slurm signal this script 5 minutes before the time
# limit; it forwards SIGUSR1 to every training process, which checkpoint at the next step and
# requeue the job (`scontrol requeue`). `scancel --signal=USR1 --batch JOBID` does the same by hand.
# Plain `scancel JOBID`, the time limit itself and SIGTERM pre-emption: every rank saves the same
# step and the job ends (rerun or requeue it to resume). Slurm kills what is left KillWait seconds
# after that SIGTERM (`scontrol show config | grep KillWait`, default 30): one training step plus
# one checkpoint must fit in it; the ranks warn in the log when they do not (VITSCALE_GRACE_SECONDS
# is taken from KillWait). A signal that arrives during start-up is kept and acted on at the
# first step boundary.
#
#SBATCH --job-name=vit_h14_jft
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# Stop signals from the first line on: kept until srun runs, then forwarded (see forward below).
pending=""
trap 'pending+=" USR1"' USR1
trap 'pending+=" TERM"' TERM

die() {
  echo "pretrain_vit_h14.sh: $*" >&2
  exit 2
}

require_whole_number() {
  # Before any arithmetic: bash evaluates a variable's text inside $(( )) as code.
  local name=$1 value=$2
  [[ $value =~ ^[0-9]+$ ]] || die "$name must be a whole number, got '$value'"
}

[ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch (for one machine without Slurm use launch/torchrun.sh)"
job_id=$SLURM_JOB_ID
require_whole_number SLURM_JOB_ID "$job_id"
restart=${SLURM_RESTART_COUNT:-0}
require_whole_number SLURM_RESTART_COUNT "$restart"

repo=${VITSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -x "$repo/launch/torchrun.sh" ] && [ -f "$repo/vitscale/train.py" ] \
  || die "no vitscale checkout at '$repo': submit from the repository root or set VITSCALE_ROOT"
cd -- "$repo"

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
require_whole_number SLURM_JOB_NUM_NODES "$nodes"
master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Below Linux's ephemeral range (32768-60999): no outgoing connection can hold the port already.
master_port=${VITSCALE_MASTER_PORT:-$((20000 + job_id % 12000))}
require_whole_number VITSCALE_MASTER_PORT "$master_port"

gpus=${VITSCALE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
require_whole_number VITSCALE_GPUS_PER_NODE "$gpus"
if [ "$gpus" = 0 ]; then
  procs=${VITSCALE_PROCS_PER_NODE:-1}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
else
  procs=${VITSCALE_PROCS_PER_NODE:-$gpus}
fi
require_whole_number VITSCALE_PROCS_PER_NODE "$procs"

log_dir=${VITSCALE_LOG_DIR:-$repo/logs/$job_id}/restart$restart
mkdir -p -- "$log_dir"

# train.py arguments as an array: values reach Python verbatim, nothing is ever evaluated.
train_args=(--config "${VITSCALE_CONFIG:-configs/vit_h14_jft.yaml}")
[ -n "${VITSCALE_DS_CONFIG:-}" ] && train_args+=(--ds_config "$VITSCALE_DS_CONFIG")
read -r -a env_overrides <<<"${VITSCALE_OVERRIDES:-}"  # splits on whitespace; read never globs
train_args+=("${env_overrides[@]}")
[ -n "${VITSCALE_OUTPUT_DIR:-}" ] && train_args+=("run.output_dir=$VITSCALE_OUTPUT_DIR")
[ -n "${VITSCALE_METRICS_PORT:-}" ] && train_args+=("metrics.port=$VITSCALE_METRICS_PORT")
[ -n "${VITSCALE_METRICS_ADDRESS:-}" ] && train_args+=("metrics.address=$VITSCALE_METRICS_ADDRESS")
[ -n "${VITSCALE_PROMETHEUS_TARGETS:-}" ] && train_args+=("metrics.file_sd_dir=$VITSCALE_PROMETHEUS_TARGETS")
train_args+=("$@")

export VITSCALE_NNODES=$nodes VITSCALE_NPROC_PER_NODE=$procs VITSCALE_RDZV_ID=$job_id
export VITSCALE_RDZV_ENDPOINT=$master_addr:$master_port VITSCALE_LOG_DIR=$log_dir
export MASTER_ADDR=$master_addr MASTER_PORT=$master_port
# A node whose ranks stopped after saving must not look failed to srun: --kill-on-bad-exit would
# cut the other nodes, one of which may still be saving or requeueing the job.
export VITSCALE_STOPPED_EXIT_CODE=0

# The grace period a SIGTERM leaves (Slurm's KillWait): the ranks warn when step + save exceed it.
if [ -z "${VITSCALE_GRACE_SECONDS:-}" ]; then
  kill_wait=$(scontrol show config 2>/dev/null | sed -n 's/^KillWait *= *\([0-9][0-9]*\) sec.*/\1/p' | head -n 1) \
    || kill_wait=""
  if [ -n "$kill_wait" ]; then export VITSCALE_GRACE_SECONDS=$kill_wait; fi
fi

printf 'pretrain_vit_h14.sh: job %s restart %s: %s node(s) x %s process(es) (%s GPU(s)/node), rendezvous %s, logs %s\n' \
  "$job_id" "$restart" "$nodes" "$procs" "$gpus" "$VITSCALE_RDZV_ENDPOINT" "$log_dir"
printf 'pretrain_vit_h14.sh: train.py'
printf ' %q' "${train_args[@]}"
printf '\n'

# srun passes every SLURM_* variable on; its own task layout must not follow the batch options.
srun_args=(--nodes "$nodes" --ntasks "$nodes" --ntasks-per-node 1 --kill-on-bad-exit=1)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
srun_pid=""
forward() {
  # srun relays the signal to its task on every node: launch/torchrun.sh, which signals the ranks
  # (and holds it until they can take it). Before srun has started, the signal waits here.
  [ -n "$srun_pid" ] && [ -n "$pending" ] || return 0
  local signal
  for signal in $pending; do
    echo "pretrain_vit_h14.sh: SIG$signal received: forwarding to the training processes" >&2
    kill -s "$signal" "$srun_pid" 2>/dev/null || true
  done
  pending=""
}
trap 'pending+=" USR1"; forward' USR1
trap 'pending+=" TERM"; forward' TERM
srun "${srun_args[@]}" "$repo/launch/torchrun.sh" "${train_args[@]}" &
srun_pid=$!
forward

# `wait` returns early whenever a trapped signal arrives; keep waiting until srun is gone.
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?
# Rank 0 removes its Prometheus target file at exit; this catches a rank 0 that was killed.
if [ -n "${VITSCALE_PROMETHEUS_TARGETS:-}" ]; then
  rm -f -- "$VITSCALE_PROMETHEUS_TARGETS/vitscale_${job_id}_"*.json
fi
# Stopped on request after saving (a rank's own exit code 75, recorded per node by torchrun.sh),
# not merely signalled: a signal that came after the last step leaves a finished run finished.
if [ "$status" = 0 ] && grep -qsx 75 "$log_dir"/exit_codes/*/rank* ; then
  status=75  # vitscale/engine/faults.py EXIT_STOPPED: saved; a requeued job resumes from it
fi
echo "pretrain_vit_h14.sh: training exited with status $status"
exit "$status"
