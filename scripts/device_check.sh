#!/usr/bin/env bash
# scripts/device_check.sh [--dry-run] [OUT_DIR]: the GPU bring-up check (vitscale/bench/device.py).
#
# On the lent GPU machine (its image: Python 3.12, torch, triton; no deepspeed or webdataset, no
# network), after scripts/device_wheels.sh has built .whl/ here:
#     device run, carry [".whl"]:  scripts/device_check.sh "$OUT"
# It installs .whl/ into a private folder, then runs every stage (about 8 minutes in all, each
# stage time-boxed) and writes OUT_DIR/device_check.json and device_check.md.
# --dry-run: every stage at tiny shapes on the CPU (Triton interpreter, gloo); the test suite
# runs it so the check cannot rot before a GPU is seen.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
out=${1:-${OUT:-runs/device_check}}
python=${VITSCALE_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

if ! "$python" -c "import deepspeed, webdataset" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "device_check.sh: deepspeed/webdataset are missing and .whl/ is empty: run scripts/device_wheels.sh" \
         "where pip works, and carry .whl" >&2
    exit 2
  fi
  site=${VITSCALE_SITE:-/tmp/vitscale-site}
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# A checkout that was never installed: kernels/ is the package vitscale.kernels (setup.py maps
# it); a link gives the same import here, removed again at the end.
link=""
if ! "$python" -c "import vitscale.kernels" 2>/dev/null; then
  ln -s ../kernels vitscale/kernels
  link=vitscale/kernels
  trap 'rm -f "$link"' EXIT
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m vitscale bench device "${dry[@]}" --out "$out"
