#!/usr/bin/env bash
# scripts/device_wheels.sh: build .whl/, the Python packages the GPU machine's image lacks, as
# CPython 3.12 manylinux x86_64 wheels (that image has no network; see scripts/device_check.sh).
#
# The versions are this checkout's (.venv), so the GPU runs what the tests ran. DeepSpeed is
# published as a source archive: built with DS_BUILD_OPS=0 it is one pure-Python wheel (its
# C++/CUDA ops compile on first use, and vitscale uses none of them). Everything else that
# deepspeed and webdataset need (torch, numpy, einops, msgpack, ninja, psutil, py-cpuinfo,
# pyyaml, tqdm, packaging, xxhash, prometheus-client, safetensors) is in that image already.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${VITSCALE_PYTHON:-.venv/bin/python}
[ -x "$python" ] || { echo "device_wheels.sh: $python not found: run 'make setup' first" >&2; exit 2; }
mkdir -p .whl
if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo /.whl/ >> .git/info/exclude
fi

version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -f .whl/*.whl
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
wanted=()
for name in webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection; do
  wanted+=("$name==$(version "$name")")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wanted[@]}"
du -ch .whl/*.whl | tail -1
ls .whl
