"""Faults on 2 CPU ranks (gloo): SIGUSR1 to one rank, NaN on one rank, a rank hung in a
collective; invalid configs refused before any process group; requeue and watchdog units."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_engine_support import (REPO, Ranks, engine_digits, free_port, module_state, read_log, run_job,  # noqa: F401
                                 tiny_args, wait_for)
from vitscale.engine import checkpoint as ckpt
from vitscale.engine import faults


def fake_scontrol(tmp_path):
    """A `scontrol` first on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    return bin_dir, calls


def test_usr1_to_one_rank_saves_same_step_requeues_and_nan_on_one_rank_is_skipped(tmp_path, engine_digits):
    bin_dir, calls = fake_scontrol(tmp_path)
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=100000", "engine.checkpoint_every=1", "engine.keep_last=100000")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "VITSCALE_INJECT_FAULT": "nan_loss@step=3,rank=1"}
    job = Ranks(args, env=env, logs=tmp_path / "logs")
    try:
        wait_for(lambda: any(r.get("step", 0) >= 6 for r in read_log(run_dir)), 180, "step 6")
        job.procs[1].send_signal(signal.SIGUSR1)  # rank 1 only
        codes = job.wait(120)
    finally:
        job.kill()
    assert codes == [faults.EXIT_STOPPED] * 2, job.output()

    # Both ranks saved the same step, and the checkpoint is complete (every rank finished it).
    last = ckpt.latest_complete(run_dir)
    step = json.loads((last / "trainer.json").read_text())["step"]
    assert [ckpt.safe_torch_load(ckpt.rank_state_path(last, r))["step"] for r in (0, 1)] == [step, step]
    assert f"step {step}: SIGUSR1" in job.output(0)
    assert calls.read_text().split("\n")[0] == "requeue 4242"
    assert len(calls.read_text().splitlines()) == 1  # rank 0 only

    # NaN loss on rank 1 at step 3: nobody updated; counted once; training went on.
    before, skipped, after = (ckpt.checkpoint_dir(run_dir, s) for s in (2, 3, 4))
    weights_before, weights_skipped = module_state(before), module_state(skipped)
    assert all(torch.equal(weights_before[k], weights_skipped[k]) for k in weights_before)
    assert not all(torch.equal(weights_skipped[k], v) for k, v in module_state(after).items())
    for rank in (0, 1):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        moments = [ckpt.safe_torch_load(path / name)["optimizer_state_dict"]["base_optimizer_state"]["state"]
                   for path in (before, skipped)]
        for a, b in zip(moments[0].values(), moments[1].values()):
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    log = read_log(run_dir)
    assert [r["step"] for r in log if r.get("nonfinite_skip")] == [3]
    assert [r for r in log if r.get("step") == 3 and "loss" in r][0]["loss"] is None
    assert [r for r in log if r.get("step") == step and "loss" in r][0]["nonfinite_total"] == 1
    assert json.loads((last / "trainer.json").read_text())["nonfinite_total"] == 1


def test_too_many_nonfinite_steps_in_a_row_stop_with_their_own_exit_code(tmp_path, engine_digits):
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=20", "engine.max_consecutive_nonfinite=3",
                     "engine.checkpoint_every=1")
    job = Ranks(args, env={"VITSCALE_INJECT_FAULT": "nan_loss@rank=0"}, logs=tmp_path / "logs")  # every step
    codes = job.wait(180)
    assert codes == [faults.EXIT_NONFINITE] * 2, job.output()
    assert [r["step"] for r in read_log(run_dir) if r.get("nonfinite_skip")] == [1, 2, 3]
    assert "3 consecutive non-finite steps" in job.output(0)
    # Skipped steps leave the state as it was, so their checkpoints are sound; step 3 ended the run.
    last = ckpt.latest_complete(run_dir)
    assert last == ckpt.checkpoint_dir(run_dir, 2)
    assert json.loads((last / "trainer.json").read_text())["consecutive_nonfinite"] == 2


def test_a_rank_slowed_in_its_forward_is_named_as_the_straggler(tmp_path, engine_digits):
    """0.4 s more compute per step on rank 1: the step times of both ranks grow alike (rank 0 waits
    in the gradient reduction), but the straggler view (own compute + data wait) names rank 1."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=6", "run.log_every=3")
    job = run_job(args, tmp_path / "logs", env={"VITSCALE_INJECT_FAULT": "sleep@point=forward,rank=1,seconds=0.4"})
    flagged = [r["straggler"] for r in read_log(run_dir) if "straggler" in r]
    assert [f["rank"] for f in flagged] == [1, 1], job.output()
    assert all(f["compute_seconds"] >= 0.4 and f["ratio"] > 1.5 for f in flagged)
    assert "straggler: rank 1" in job.output(0) and "compute-bound" in job.output(0)


def test_rank_asleep_in_a_collective_ends_the_job_quickly(tmp_path, engine_digits):
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=50", "engine.collective_timeout_seconds=8",
                     "engine.watchdog_seconds=12")
    job = Ranks(args, env={"VITSCALE_INJECT_FAULT": "sleep@point=collective,step=3,rank=1,seconds=600"},
                logs=tmp_path / "logs")
    try:
        wait_for(lambda: any(r.get("step") == 2 for r in read_log(run_dir)), 180, "step 2")
        hang_started = time.monotonic()
        codes = job.wait(90)
        ended_after = time.monotonic() - hang_started
    finally:
        job.kill()
    assert codes == [faults.EXIT_HUNG] * 2, job.output()
    assert ended_after < 40, ended_after
    assert "a collective timed out" in job.stderr(0)
    stacks = job.stderr(1)
    assert "no progress for" in stacks and "maybe_inject" in stacks  # where it hung, from faulthandler


def test_stopped_rank_ends_the_job_within_the_timeout_in_deepspeeds_own_groups(tmp_path, engine_digits):
    """Finding: with one rank SIGSTOPped, rank 0 sat in DeepSpeed's ZeRO all-reduce (a group made
    with new_group(ranks), so torch's 30-minute gloo default) for 636 s, until the watchdog."""
    from vitscale.engine.distributed import apply_timeout_to_new_groups  # noqa: F401  (the fix)

    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=400", "engine.collective_timeout_seconds=10",
                     "engine.watchdog_seconds=600", "run.log_every=1")
    job = Ranks(args, logs=tmp_path / "logs")
    try:
        wait_for(lambda: any(r.get("step") == 3 for r in read_log(run_dir)), 180, "step 3")
        job.procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        while job.procs[0].poll() is None and time.monotonic() - stopped < 120:
            time.sleep(0.2)
        ended_after = time.monotonic() - stopped
    finally:
        job.procs[1].send_signal(signal.SIGCONT)
        job.kill()
    assert job.procs[0].returncode == faults.EXIT_HUNG, job.output(0)
    assert ended_after < 10 + 30, ended_after
    assert "a collective timed out" in job.stderr(0)


def test_under_plain_torchrun_a_peer_killed_9_leaves_rank_0_exiting_4_without_a_traceback(tmp_path, engine_digits):
    """Finding: under plain torchrun (DataLoader workers running), kill -9 of a peer made rank 0
    exit 1 with a DataLoader traceback instead of 4. torchrun's own exit is 1 whatever the
    ranks say; its failure table must show rank 0's code."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=40", "data.num_workers=2")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "VITSCALE_INJECT_FAULT": "kill@point=step_start,step=4,rank=1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", str(REPO / "vitscale" / "train.py"), *args],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    failures = output.split("Root Cause", 1)
    assert len(failures) == 2 and "exitcode  : 4" in failures[0] and "exitcode  : -9" in failures[1], output
    assert "vitscale: rank 0: a collective timed out or failed" in output
    assert "DataLoader" not in output and "vitscale/train.py\", line" not in output, output


# ---------------------------------------------------------------------------------------------
# Invalid configs: one line each, before any process group.


def prepare(tmp_path, monkeypatch, *overrides, ds_config=None, world_size=1):
    import argparse

    from vitscale.train import prepare as prepare_job

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    args = argparse.Namespace(config=str(REPO / "configs" / "demo.yaml"), ds_config=ds_config, local_rank=None,
                              overrides=[f"run.output_dir={tmp_path}", *overrides])
    return prepare_job(args)


@pytest.mark.parametrize("overrides, ds_json, world_size, expected", [
    (["engine.zero_stage=4"], None, 1, "config engine.zero_stage: 4 is not a ZeRO stage"),
    ([], {"zero_optimization": {"stage": 5}}, 1, "zero_optimization.stage 5 is not a ZeRO stage"),
    (["engine.micro_batch_size=8", "engine.global_batch_size=24"], None, 2,
     "config engine.global_batch_size: 24 is not divisible by micro-batch 8 x world size 2 = 16"),
    ([], {"train_batch_size": 128, "zero_optimization": {"stage": 2}}, 2,
     "train_batch_size=128 in the DeepSpeed JSON disagrees with engine.global_batch_size=64"),
    (["model.name=Q/16"], None, 1, "config model.name: unknown model 'Q/16'"),
    (["data.train_shards=/nonexistent/train-{000000..000003}.tar"], None, 1,
     "config data.train_shards: 4 of 4 shards do not exist (first: /nonexistent/train-000000.tar)"),
])
def test_invalid_configs_fail_with_one_line(tmp_path, monkeypatch, engine_digits, overrides, ds_json, world_size,
                                            expected):
    from vitscale.errors import VitscaleError

    ds_path = None
    if ds_json is not None:
        ds_path = tmp_path / "ds.json"
        ds_path.write_text(json.dumps(ds_json))
    from test_engine_support import merge_overrides

    with pytest.raises(VitscaleError) as error:
        prepare(tmp_path, monkeypatch, *merge_overrides([f"data.train_shards={engine_digits[0]}"], overrides),
                ds_config=ds_path, world_size=world_size)
    message = str(error.value)
    assert expected in message and "\n" not in message and "(" in message  # names the fix too
    import torch.distributed as dist

    assert not dist.is_initialized()


@pytest.mark.parametrize("entry", [["vitscale/train.py"], ["-m", "vitscale", "train"]])
def test_invalid_config_exits_2_before_waiting_for_peers(tmp_path, entry):
    """Rank 0 of a 2-rank job whose peer never comes: the config error must end it at once
    (a process group would wait for the peer) with one line on stderr."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, *entry, "--config", "configs/demo.yaml", "--ds_config",
                             "configs/zero2.json", "data.train_shards=/nonexistent.tar", f"run.output_dir={tmp_path}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.train_shards" in lines[0] and "do not exist" in lines[0], result.stderr


# ---------------------------------------------------------------------------------------------
# Units.


def test_requeue_validates_the_job_id(tmp_path, monkeypatch):
    bin_dir, calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert not faults.requeue_slurm_job({"SLURM_JOB_ID": "123; rm -rf /"})
    assert not faults.requeue_slurm_job({})
    assert not calls.exists()
    assert faults.requeue_slurm_job({"SLURM_JOB_ID": "987"})
    assert calls.read_text() == "requeue 987\n"


def test_watchdog_dumps_stacks_and_exits():
    code = ("import time\nfrom vitscale.engine.faults import Watchdog\nWatchdog(1.0, rank=0).start()\n"
            "def stuck_in_collective():\n    time.sleep(60)\nstuck_in_collective()\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == faults.EXIT_HUNG
    assert time.monotonic() - started < 20
    assert "no progress for" in result.stderr and "stuck_in_collective" in result.stderr


def test_stop_requests_record_the_strongest_signal():
    stops = faults.StopRequests().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.requested == faults.STOP_TERM
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.requested == faults.STOP_REQUEUE and stops.signal_name == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
