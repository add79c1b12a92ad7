#!/usr/bin/env bash
# launch/local_cpu.sh --config configs/demo.yaml 'data.train_shards=DIR/train-{000000..000011}.tar'
#
# The main job on this machine's CPU: 2 processes (VITSCALE_NPROC to change), gloo collectives,
# DeepSpeed ZeRO-2 from configs/zero2.json unless the arguments name another --ds_config.
# Arguments go to vitscale/train.py unchanged (--config, --ds_config, dotted KEY=VALUE overrides).
# `vitscale demo` (make demo) runs this with configs/demo.yaml on the digits shards.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nproc=${VITSCALE_NPROC:-2}
[[ $nproc =~ ^[1-9][0-9]*$ ]] || { echo "launch/local_cpu.sh: VITSCALE_NPROC must be a positive whole number, got '$nproc'" >&2; exit 2; }
python=${VITSCALE_PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3

ds_args=(--ds_config "$repo/configs/zero2.json")
for arg in "$@"; do
  case $arg in --ds_config|--ds_config=*|--ds-config|--ds-config=*) ds_args=() ;; esac
done

export DS_ACCELERATOR=cpu
# One thread per process: the processes share the cores, oversubscription only slows them down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$python" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc" \
  "$repo/vitscale/train.py" "${ds_args[@]}" "$@"
