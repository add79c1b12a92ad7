"""`sbatch launch/pretrain_vit_h14.sh`, unmodified, on a real single-node Slurm (Debian's slurmctld,
slurmd and munge on loopback, started by tests/services/slurm.sh).

The tiny CPU job is chosen only through sbatch options and environment variables. It trains,
gets SIGUSR1 the way Slurm's pre-emption warning arrives (`scancel --signal=USR1 --batch`),
checkpoints and requeues itself; the requeued job resumes from that checkpoint and completes with
a final checkpoint. The job name and a config value carry shell metacharacters throughout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from services.daemons import free_port, slurm_cluster
from services.jobs import REPO, TINY_CONFIG, read_log, tiny_overrides, write_tiny_jft_shards
from vitscale.cli import main as vitscale_main
from vitscale.engine.checkpoint import is_complete, latest_complete

pytestmark = [pytest.mark.slow, pytest.mark.services]

STEPS = 120


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster() as cluster:
        yield cluster


def submit_tiny_job(slurm, tmp_path, job_name: str, hostile_value: str = "localhost", *, steps: int = STEPS,
                    time_limit: str = "10", sbatch_extra: tuple[str, ...] = ()) -> str:
    shards = tmp_path / "shards"
    shards = write_tiny_jft_shards(shards) if not shards.exists() else str(shards / "train-{000000..000003}.tar")
    env = {"VITSCALE_CONFIG": TINY_CONFIG, "VITSCALE_PROCS_PER_NODE": "2",
           "VITSCALE_OUTPUT_DIR": str(tmp_path / "runs"), "VITSCALE_LOG_DIR": str(tmp_path / "logs"),
           "VITSCALE_PYTHON": sys.executable, "VITSCALE_METRICS_PORT": str(free_port(2))}
    sbatch_options = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--time={time_limit}",
                      f"--output={tmp_path}/slurm-%j.out", f"--job-name={job_name}", *sbatch_extra]
    overrides = tiny_overrides(shards, tmp_path / "runs", steps, **{"metrics.advertise_host": hostile_value})
    overrides = [item for item in overrides if not item.startswith(("run.output_dir=", "metrics.port="))]
    return slurm.sbatch([*sbatch_options, "launch/pretrain_vit_h14.sh", *overrides], env=env, cwd=REPO)


def test_sbatch_trains_checkpoints_on_usr1_requeues_and_resumes(slurm, tmp_path):
    canary = tmp_path / "canary"
    job_name = f"vit;touch {canary};$(touch {canary})'\"`touch {canary}`"
    hostile_value = f"h;touch {canary};$(touch {canary})'\""
    job = submit_tiny_job(slurm, tmp_path, job_name, hostile_value)
    run_dir = tmp_path / "runs" / "vit_h14_jft_tiny"
    output = tmp_path / f"slurm-{job}.out"

    def diagnostics() -> str:
        return (output.read_text()[-4000:] if output.exists() else "(no job output)") + "\n" + slurm.logs()

    # 1. It trains under Slurm.
    deadline = time.monotonic() + 180
    while len(read_log(run_dir)) < 3:
        info = slurm.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{info}\n{diagnostics()}"
        assert time.monotonic() < deadline, f"no training steps logged\n{diagnostics()}"
        time.sleep(0.3)
    stored_name = slurm.command("squeue", "-h", "-j", job, "-O", "Name:1000").strip()
    assert stored_name == job_name  # stored verbatim, never evaluated

    # 2. The pre-emption warning: checkpoint, then the job requeues itself.
    slurm.command("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_for(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", 120,
                          "requeued")
    checkpoint = latest_complete(run_dir)
    assert checkpoint is not None, diagnostics()
    stopped_at = int(checkpoint.name.split("_")[-1])
    assert 3 <= stopped_at < STEPS
    assert max(line["step"] for line in read_log(run_dir)) == stopped_at

    # 3. Requeued (Slurm holds it cred_expire + 1 s; start it now), it resumes from that checkpoint.
    slurm.command("scontrol", "update", f"jobid={job}", "StartTime=now")
    info = slurm.wait_until_finished(job, timeout=240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{diagnostics()}"
    text = output.read_text()
    assert f"resumed from {checkpoint} at step {stopped_at}" in text
    assert "job {} restart 0".format(job) in text and "job {} restart 1".format(job) in text
    steps = [line["step"] for line in read_log(run_dir)]
    assert steps == list(range(1, STEPS + 1))  # no step lost, none trained twice
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert is_complete(final) and latest_complete(run_dir) == final

    # The run's own log renders (`vitscale report`): CPU runs log no MFU, so no MFU plot.
    assert vitscale_main(["report", str(run_dir)]) == 0
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == ["loss.png", "lr.png", "throughput.png"]

    # Per-job, per-restart, per-rank logs.
    for restart in (0, 1):
        rank_logs = sorted(p.parent.name for p in (tmp_path / "logs" / f"restart{restart}").rglob("stdout.log"))
        assert rank_logs == ["0", "1"], list((tmp_path / "logs").rglob("*"))
    exit_codes = sorted((tmp_path / "logs" / "restart1" / "exit_codes").glob("*/rank*"))
    assert [(p.name, p.read_text().strip()) for p in exit_codes] == [("rank0", "0"), ("rank1", "0")]

    # Shell metacharacters in the job name and a config value ran nothing and arrived verbatim.
    assert not canary.exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["metrics"]["advertise_host"] == hostile_value


def wait_for_steps(slurm, job: str, run_dir: Path, count: int, diagnostics) -> None:
    deadline = time.monotonic() + 180
    while len(read_log(run_dir)) < count:
        info = slurm.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{info}\n{diagnostics()}"
        assert time.monotonic() < deadline, f"no training steps logged\n{diagnostics()}"
        time.sleep(0.3)


def rank_saves(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.glob("rank_*.pt"))


@pytest.mark.parametrize("how", ["scancel", "time limit"])
def test_sigterm_from_scancel_or_the_time_limit_saves_every_rank_then_a_rerun_resumes(slurm, tmp_path, how):
    """Plain `scancel JOB` and the job's time limit both SIGTERM every process of the job (torchrun,
    the ranks, their DataLoader workers) and SIGKILL them KillWait (30 s) later: every rank saves
    the same step in that grace period, and the next submission resumes there."""
    steps = 100_000  # never reached: the stop ends the first job
    # The script asks for USR1 300 s before the limit (checkpoint + requeue); to see the limit's own
    # SIGTERM, that warning is swapped for a harmless SIGURG here.
    job = submit_tiny_job(slurm, tmp_path, "vit_term", steps=steps, time_limit="1" if how == "time limit" else "10",
                          sbatch_extra=("--signal=B:URG@1",) if how == "time limit" else ())
    run_dir = tmp_path / "runs" / "vit_h14_jft_tiny"
    output = tmp_path / f"slurm-{job}.out"

    def diagnostics() -> str:
        return (output.read_text()[-4000:] if output.exists() else "(no job output)") + "\n" + slurm.logs()

    wait_for_steps(slurm, job, run_dir, 3, diagnostics)
    if how == "scancel":
        slurm.command("scancel", job)
    info = slurm.wait_until_finished(job, timeout=240)
    assert info["JobState"] == ("CANCELLED" if how == "scancel" else "TIMEOUT"), f"{info}\n{diagnostics()}"
    checkpoint = latest_complete(run_dir)
    assert checkpoint is not None, diagnostics()
    assert rank_saves(checkpoint) == ["rank_00000.pt", "rank_00001.pt"]
    stopped_at = int(checkpoint.name.split("_")[-1])
    assert max(line["step"] for line in read_log(run_dir)) == stopped_at
    exit_codes = sorted((tmp_path / "logs" / "restart0" / "exit_codes").glob("*/rank*"))
    assert [p.read_text().strip() for p in exit_codes] == ["75", "75"], diagnostics()  # saved, then stopped
    assert "DataLoader worker" not in diagnostics()

    rerun = submit_tiny_job(slurm, tmp_path, "vit_term", steps=stopped_at + 5)
    info = slurm.wait_until_finished(rerun, timeout=240)
    assert info["JobState"] == "COMPLETED", info
    assert f"resumed from {checkpoint} at step {stopped_at}" in (tmp_path / f"slurm-{rerun}.out").read_text()
    assert [line["step"] for line in read_log(run_dir)] == list(range(1, stopped_at + 6))


def test_usr1_one_second_after_the_start_kills_no_rank_and_requeues(slurm, tmp_path):
    """The pre-emption warning while the job is still starting (Python, torch and DeepSpeed not
    yet loaded): kept by the batch script, torchrun.sh and the ranks until they can act on it,
    then a checkpoint at the first step boundary and a requeue."""
    job = submit_tiny_job(slurm, tmp_path, "vit_early", steps=100_000)
    run_dir = tmp_path / "runs" / "vit_h14_jft_tiny"
    output = tmp_path / f"slurm-{job}.out"
    slurm.wait_for(job, lambda info: info.get("JobState") == "RUNNING", 120, "running")
    time.sleep(1)
    slurm.command("scancel", "--signal=USR1", "--batch", job)
    slurm.wait_for(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", 180, "requeued")
    text = output.read_text()
    checkpoint = latest_complete(run_dir)
    assert checkpoint is not None and rank_saves(checkpoint) == ["rank_00000.pt", "rank_00001.pt"], text
    exit_codes = sorted((tmp_path / "logs" / "restart0" / "exit_codes").glob("*/rank*"))
    assert [p.read_text().strip() for p in exit_codes] == ["75", "75"], text  # no rank died of the signal
    assert "SIGUSR1 (pre-emption warning) received" in text and "requeued Slurm job" in text
    slurm.command("scancel", job)
    slurm.wait_until_finished(job, timeout=60)


def test_no_job_process_outlives_its_job(slurm):
    """After the job above, Slurm tracks no process of any job on the node."""
    assert slurm.command("squeue", "-h") == ""
    listed = slurm.command("scontrol", "listpids", check=False)
    assert [line for line in listed.splitlines()[1:] if line.strip()] == []


def test_teardown_cancels_running_jobs_and_leaves_no_process(tmp_path):
    with slurm_cluster() as cluster:
        job = cluster.sbatch(["--wrap", "sleep 300", f"--output={tmp_path}/sleep-%j.out"])
        cluster.wait_for(job, lambda info: info.get("JobState") == "RUNNING", 60, "running")
        deadline = time.monotonic() + 30
        pids: list[int] = []
        while not pids and time.monotonic() < deadline:
            listed = cluster.command("scontrol", "listpids", job, check=False).splitlines()[1:]
            pids = [int(line.split()[0]) for line in listed if line.split() and line.split()[0].isdigit()]
            time.sleep(0.2)
        assert pids
        daemon_pids = [int(p.read_text()) for p in cluster.state.glob("*.bgpid")]
        assert len(daemon_pids) == 3
    for pid in pids + daemon_pids:
        assert not process_alive(pid), pid


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (its parent reaps it)
