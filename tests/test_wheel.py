"""A built wheel, installed (not editable) into a fresh venv, runs `vitscale demo` outside the
source tree: configs travel as package data, the launcher's job is run as a module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_into_a_fresh_venv_runs_the_demo_outside_the_checkout(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                                "__pycache__", ".*_cache"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = dist.glob("vitscale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vitscale/configs/demo.yaml", "vitscale/configs/zero2.json", "vitscale/kernels/triton_attention.py",
            "vitscale/configs/ablations/base.yaml"} <= names

    # A new venv whose only vitscale is the wheel; torch, DeepSpeed & co. come from the test venv
    # (a plain path line: the test venv's editable-install hook is not loaded).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VITSCALE_PYTHON")}
    where = subprocess.run([str(python), "-c", "import vitscale; print(vitscale.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout + where.stderr
    done = subprocess.run([str(venv / "bin" / "vitscale"), "demo", "--steps", "30", "--output-dir", str(work / "runs")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "-m vitscale.train" in done.stdout and str(purelib / "vitscale" / "configs" / "demo.yaml") in done.stdout
    accuracy = float(re.search(r"held-out accuracy ([\d.]+)%", done.stdout).group(1)) / 100
    assert accuracy > 0.2, done.stdout[-2000:]  # 10 classes: chance is 0.1; 30 steps reach ~0.4
    assert list((work / "runs").glob("demo-*/checkpoints/step_00000030/COMPLETE"))
