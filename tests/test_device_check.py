"""The GPU bring-up check (scripts/device_check.sh, vitscale/bench/device.py) on the CPU: every
stage at tiny shapes through the same code the GPU runs, so it works the first time a GPU is lent."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from vitscale.bench import device

REPO = device.REPO


@pytest.mark.slow
def test_dry_run_passes_every_stage_and_writes_the_table(tmp_path):
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DS_ACCELERATOR")}
    done = subprocess.run([str(REPO / "scripts" / "device_check.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=900, env=env)
    report = json.loads((out / "device_check.json").read_text())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    stages = report["stages"]
    assert list(stages) == list(device.STAGES) and all(s["status"] == "ok" for s in stages.values()), stages
    environment = stages["environment"]["result"]
    assert environment["gemm"]["tflops"] > 0 and environment["copy"]["gb_per_s"] > 0
    kernel = stages["kernel"]["result"]
    assert kernel["passed"] and len(kernel["rows"]) == 2 * (2 * len(device.DRY_KERNEL_SHAPES) + 1)
    assert {row["call"] for row in kernel["rows"]} == {"autotuning call", "after autotuning", "autograd"}
    backends = {row["backend"] for row in stages["attention"]["result"]["rows"] if "error" not in row}
    assert {"triton", "sdpa-math"} <= backends
    for name, engine in (("train_local", "local"), ("train_deepspeed", "deepspeed ZeRO-2")):
        rows = stages[name]["result"]["rows"]
        assert rows and all("error" not in row for row in rows), rows
        for row in rows:
            assert row["engine"] == engine and row["images_per_second"] > 0
            assert row["tokens_per_second"] == row["images_per_second"] * 5  # 32 px / 16: 4 patches + [class]
            assert 0 < row["mfu_measured_gemm"] and row["mfu_datasheet"] is None  # no datasheet peak for a CPU
            assert row["host_syncs_per_step"] >= 0
    local_syncs = [row["host_syncs_per_step"] for row in stages["train_local"]["result"]["rows"]]
    assert max(local_syncs) == 0, local_syncs  # the local engine's step never waits for the device
    job = stages["train_job"]["result"]
    assert (job["first_exit"], job["resume_exit"], job["resumed_from_step"]) == (0, 0, 4), job["output_tail"]
    assert job["final_checkpoint_verifies"] and job["final_checkpoint"].endswith("step_00000006")
    assert job["scrape"]["ok"] and job["scrape"]["vitscale_train_steps_total"] >= 0  # 4 steps: often over first
    markdown = (out / "device_check.md").read_text()
    assert "| kernel check |" in markdown and "| train step |" in markdown and "train.py job: exit 0" in markdown


def test_a_stage_past_its_time_limit_is_reported_and_the_next_one_still_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(device.DRY_STAGE_SECONDS, "environment", 0.5)
    args = argparse.Namespace(out=str(tmp_path), dry_run=True, stages="environment,kernel", stage=None)
    assert device.run(args) == 1
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["stages"]["environment"]["status"] == "timeout after 0.5 s"
    assert report["stages"]["kernel"]["status"] == "ok"
    assert "environment | timeout after 0.5 s" in (tmp_path / "device_check.md").read_text()
    assert device.run(argparse.Namespace(out=str(tmp_path), dry_run=True, stages="kernel,gpu", stage=None)) == 2
