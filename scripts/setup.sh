#!/usr/bin/env bash
# Usage: scripts/setup.sh [extras]     e.g. scripts/setup.sh test
# Creates .venv and installs torch (never newer than the release pinned below), then vitscale
# in editable mode with the given extras. Re-running is cheap: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
venv=${VITSCALE_VENV:-.venv}
python=${PYTHON:-python3}

case "$(uname -m)" in
  aarch64|arm64) torch_pins="torch==2.9.1 torchvision==0.24.1" ;;
  *)             torch_pins="torch==2.14.1 torchvision==0.29.1" ;;
esac

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.vitscale-setup"
want="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16) $torch_pins [$extras]"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip setuptools wheel >/dev/null
# torch first and pinned: an unpinned resolve would fetch a multi-GB newer CUDA build.
"${pip[@]}" $torch_pins
target="."
[ -n "$extras" ] && target=".[$extras]"
"${pip[@]}" -e "$target" $torch_pins
echo "$want" > "$stamp"
