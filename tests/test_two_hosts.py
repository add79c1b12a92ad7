"""Two test hosts (network namespaces joined by a veth pair, tests/services/hosts.py) running
`launch/torchrun.sh` as node 0 and node 1 of one job, 2 CPU ranks each, ZeRO-2 over gloo:

- without VITSCALE_SOCKET_IFNAME each node's hostname resolves to 127.0.1.1 (Debian's layout),
  and every rank refuses to start with the fix in one line instead of hanging;
- with it they train as one 4-rank job with the losses of 4 ranks on one host (bit for bit), every rank's
  /metrics is reachable from the other host at the address its file_sd target names, SIGUSR1 to
  one node stops both at one step with one checkpoint, and a rerun resumes from it on both;
- the loss of host 1 ends host 0's ranks with exit 4 within the collective timeout, and host 0
  alone (2 ranks) resumes from the last complete checkpoint, resharded.

Every process runs inside a host, so nothing outlives a test, even one killed -9 (hosts.py).
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

from services.daemons import slurm_cluster
from services.hosts import INTERFACE, can_make_hosts, two_hosts
from services.jobs import REPO, TINY_CONFIG, read_log, tiny_overrides, write_tiny_jft_shards
from vitscale.engine.checkpoint import latest_complete

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(can_make_hosts()), reason=can_make_hosts() or "ok")]

EXIT_BAD_INPUT, EXIT_HUNG, EXIT_STOPPED = 2, 4, 75
RENDEZVOUS = "host0:29400"
METRICS_PORT = 9500
COLLECTIVE_TIMEOUT = 10


def job_args(shards: str, output: Path, steps: int, **extra: str) -> list[str]:
    """4 ranks x micro-batch 4 = the global batch of 16; the learning-rate schedule's horizon is
    fixed, so runs of different lengths train the same steps identically."""
    return ["--config", TINY_CONFIG, *tiny_overrides(
        shards, output, steps=steps, **{"engine.micro_batch_size": "4", "schedule.total_steps": "200",
                                        "engine.collective_timeout_seconds": str(COLLECTIVE_TIMEOUT), **extra})]


def launcher_env(log_dir: Path, nodes: int, interface: str | None = INTERFACE) -> dict:
    env = dict(os.environ, VITSCALE_NNODES=str(nodes), VITSCALE_NPROC_PER_NODE="2", VITSCALE_RDZV_ID="two-hosts",
               VITSCALE_PYTHON=sys.executable, VITSCALE_LOG_DIR=str(log_dir), OMP_NUM_THREADS="1")
    if nodes > 1:
        env["VITSCALE_RDZV_ENDPOINT"] = RENDEZVOUS
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "VITSCALE_SOCKET_IFNAME"):
        env.pop(key, None)
    if interface:
        env["VITSCALE_SOCKET_IFNAME"] = interface
    return env


class Nodes:
    """One launch/torchrun.sh per host, their output in files."""

    def __init__(self, hosts, tmp_path: Path, name: str, args: list[str], interface: str | None = INTERFACE):
        self.logs = [tmp_path / f"{name}-{host.name}.out" for host in hosts]
        self.launchers = [
            host.popen(["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO,
                       env=launcher_env(tmp_path / f"{name}-logs", len(hosts), interface),
                       stdout=log.open("w"), stderr=subprocess.STDOUT)
            for host, log in zip(hosts, self.logs)]

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for launcher in self.launchers:
            try:
                codes.append(launcher.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"launchers still running after {timeout} s\n{self.output()}") from None
        return codes

    def wait_for_steps(self, run_dir: Path, steps: int, timeout: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(log := read_log(run_dir)) < steps:
            assert all(launcher.poll() is None for launcher in self.launchers), self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)
        return log


def losses(log: list[dict]) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in log}


def test_a_hostname_on_loopback_is_refused_on_every_node_with_the_fix(tmp_path):
    shards = write_tiny_jft_shards(tmp_path / "shards")
    with two_hosts(tmp_path / "hosts") as hosts:
        wrong = hosts[0].run(["bash", str(REPO / "launch" / "torchrun.sh"), "--help"], cwd=REPO,
                             env=launcher_env(tmp_path / "logs", 1, interface="eth7"), capture_output=True, text=True,
                             timeout=30)
        assert wrong.returncode == EXIT_BAD_INPUT, wrong.stdout + wrong.stderr
        assert f"no network interface 'eth7' on host0 (it has: lo {INTERFACE} )" in wrong.stderr
        nodes = Nodes(hosts, tmp_path, "loopback", job_args(shards, tmp_path / "runs", steps=4), interface=None)
        assert nodes.wait(timeout=120) == [EXIT_BAD_INPUT, EXIT_BAD_INPUT], nodes.output()
    for log in nodes.logs:
        text = log.read_text()
        for rank in {"host0": (0, 1), "host1": (2, 3)}[log.name.split("-")[1].removesuffix(".out")]:
            assert (f"vitscale train: rank {rank}: error: this node's hostname 'host{rank // 2}' resolves to "
                    "127.0.1.1, a loopback address") in text, nodes.output()
        assert "VITSCALE_SOCKET_IFNAME=" in text and "Traceback" not in text, nodes.output()


def test_two_hosts_train_as_one_job_stop_together_and_survive_the_loss_of_one(tmp_path):
    shards = write_tiny_jft_shards(tmp_path / "shards")
    run_dir = tmp_path / "runs" / "vit_h14_jft_tiny"
    targets = tmp_path / "targets"
    args = job_args(shards, tmp_path / "runs", steps=100_000, **{
        "engine.checkpoint_every": "4", "metrics.port": str(METRICS_PORT), "metrics.address": "0.0.0.0",
        "metrics.file_sd_dir": str(targets)})
    with two_hosts(tmp_path / "hosts") as hosts:
        # 0. The reference: the same job as 4 ranks on one host.
        reference_env = dict(launcher_env(tmp_path / "reference-logs", 1, interface=None), VITSCALE_NPROC_PER_NODE="4")
        reference = hosts[0].run(["bash", str(REPO / "launch" / "torchrun.sh"),
                                  *job_args(shards, tmp_path / "reference", steps=8)],
                                 cwd=REPO, env=reference_env, capture_output=True, text=True, timeout=240)
        assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
        expected = losses(read_log(tmp_path / "reference" / "vit_h14_jft_tiny"))
        assert sorted(expected) == list(range(1, 9))

        # 1. One job across the hosts: the one-host losses, reachable metrics, USR1 to one node.
        nodes = Nodes(hosts, tmp_path, "first", args)
        log = nodes.wait_for_steps(run_dir, 8)
        assert {step: loss for step, loss in losses(log).items() if step <= 8} == expected, nodes.output()
        (target_file,) = targets.glob("*.json")
        groups = json.loads(target_file.read_text())
        assert groups[0]["targets"] == [f"host{n}:{METRICS_PORT + local}" for n in (0, 1) for local in (0, 1)]
        assert groups[0]["labels"]["vitscale_world_size"] == "4"
        scrape = ("import re, sys, urllib.request\n"
                  "for target in sys.argv[1:]:\n"
                  "    text = urllib.request.urlopen(f'http://{target}/metrics', timeout=10).read().decode()\n"
                  "    print(target, re.search(r'^vitscale_run_info{.*rank=\"(\\d+)\"', text, re.M).group(1))")
        scraped = hosts[0].run([sys.executable, "-c", scrape, *groups[0]["targets"]], capture_output=True, text=True,
                               timeout=60)  # from host 0: host 1's ranks answer over the veth link
        assert scraped.returncode == 0, scraped.stderr
        assert scraped.stdout.split() == ["host0:9500", "0", "host0:9501", "1", "host1:9500", "2", "host1:9501", "3"]
        nodes.launchers[1].send_signal(signal.SIGUSR1)  # node 1 only: the ranks agree on a step
        assert nodes.wait(timeout=120) == [EXIT_STOPPED, EXIT_STOPPED], nodes.output()
        stopped_at = read_log(run_dir)[-1]["step"]
        assert latest_complete(run_dir).name == f"step_{stopped_at:08d}"
        assert list(targets.glob("*.json")) == []

        # 2. Rerun on both hosts resumes there; then host 1 is lost (every process, its network).
        nodes = Nodes(hosts, tmp_path, "second", args)
        nodes.wait_for_steps(run_dir, stopped_at + 1)
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'}" in nodes.logs[0].read_text()
        deadline = time.monotonic() + 120
        while (latest := latest_complete(run_dir)).name == f"step_{stopped_at:08d}":
            assert time.monotonic() < deadline and nodes.launchers[0].poll() is None, nodes.output()
            time.sleep(0.2)
        hosts[1].power_off()
        lost_at = time.monotonic()
        assert nodes.launchers[0].wait(timeout=COLLECTIVE_TIMEOUT + 60) == EXIT_HUNG, nodes.output()
        assert time.monotonic() - lost_at < COLLECTIVE_TIMEOUT + 30, nodes.output()
        survivor = nodes.logs[0].read_text()
        for rank in (0, 1):
            assert f"vitscale: rank {rank}: a collective timed out or failed" in survivor, nodes.output()
        assert "Traceback (most recent call last)" not in survivor.split("collective timed out", 1)[0]

        # 3. Host 0 alone, 2 ranks: resumes from the newest complete checkpoint, resharded. (Its
        # veth0 went with its peer: one node needs no interface.)
        latest = latest_complete(run_dir)
        resumed_step = int(latest.name.split("_")[1])
        alone = Nodes(hosts[:1], tmp_path, "alone", job_args(shards, tmp_path / "runs", steps=resumed_step + 3),
                      interface=None)
        assert alone.wait(timeout=180) == [0], alone.output()
    text = alone.logs[0].read_text()
    assert f"resumed from {latest} at step {resumed_step} (written by 4 ranks, resharded for 2)" in text, text
    assert [line["step"] for line in read_log(run_dir)][-3:] == [resumed_step + 1, resumed_step + 2, resumed_step + 3]


@pytest.mark.services
def test_sbatch_runs_the_unmodified_launcher_across_the_two_hosts(tmp_path):
    """Debian's Slurm with one slurmd per host (`slurmd -N hostN`, per-node spool, PID and log
    files, NodeAddr its veth address); slurmctld and sbatch on host 0."""
    shards = write_tiny_jft_shards(tmp_path / "shards")
    run_dir = tmp_path / "runs" / "vit_h14_jft_tiny"
    with two_hosts(tmp_path / "hosts") as hosts, slurm_cluster(hosts) as slurm:
        env = {"VITSCALE_CONFIG": TINY_CONFIG, "VITSCALE_PROCS_PER_NODE": "2", "VITSCALE_SOCKET_IFNAME": INTERFACE,
               "VITSCALE_LOG_DIR": str(tmp_path / "logs"), "VITSCALE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
        overrides = job_args(shards, tmp_path / "runs", steps=6)[2:]
        job = slurm.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
                            f"--output={tmp_path}/slurm-%j.out", "launch/pretrain_vit_h14.sh", *overrides],
                           env=env, cwd=REPO)
        info = slurm.wait_until_finished(job, timeout=240)
        output = (tmp_path / f"slurm-{job}.out").read_text()
        assert info["JobState"] == "COMPLETED" and info["NodeList"] == "host[0-1]", output[-4000:] + slurm.logs()
    assert f"job {job} restart 0: 2 node(s) x 2 process(es) (0 GPU(s)/node), rendezvous host0:" in output
    for host in ("host0", "host1"):
        assert f"launch/torchrun.sh: {host}: 2 process(es) x 2 node(s), CPU" in output, output[-4000:]
        exit_codes = tmp_path / "logs" / "restart0" / "exit_codes" / host
        codes = sorted(path.read_text().strip() for path in exit_codes.iterdir())
        assert codes == ["0", "0"], output[-4000:]
    assert [line["step"] for line in read_log(run_dir)] == list(range(1, 7))
    assert latest_complete(run_dir).name == "step_00000006"
