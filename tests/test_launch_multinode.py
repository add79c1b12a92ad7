"""Two `launch/torchrun.sh` launchers joined by a c10d rendezvous, as pretrain_vit_h14.sh starts
them on two nodes (here both on this machine, one CPU process each): they form one 2-rank job,
rank 0 lists both ranks' /metrics in its file_sd file, and SIGUSR1 delivered to the second
"node" only stops both at the same step with one complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from services.daemons import free_port
from services.jobs import REPO, TINY_CONFIG, read_log, tiny_overrides, write_tiny_jft_shards
from vitscale.engine.checkpoint import latest_complete

pytestmark = pytest.mark.slow

EXIT_STOPPED = 75


def test_two_node_launchers_rendezvous_and_stop_together_on_usr1(tmp_path):
    shards = write_tiny_jft_shards(tmp_path / "shards")
    rendezvous, metrics_ports = free_port(), [free_port(), free_port()]
    targets = tmp_path / "targets"
    launchers, logs = [], []
    for node in (0, 1):
        args = ["--config", TINY_CONFIG, *tiny_overrides(
            shards, tmp_path / "runs", steps=100_000,
            **{"metrics.port": str(metrics_ports[node]), "metrics.file_sd_dir": str(targets)})]
        env = dict(os.environ, VITSCALE_NNODES="2", VITSCALE_NPROC_PER_NODE="1", VITSCALE_RDZV_ID="multinode",
                   VITSCALE_RDZV_ENDPOINT=f"127.0.0.1:{rendezvous}", VITSCALE_PYTHON=sys.executable,
                   VITSCALE_LOG_DIR=str(tmp_path / f"logs-node{node}"))
        logs.append(tmp_path / f"node{node}.out")
        launchers.append(subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO, env=env,
                                          stdout=logs[-1].open("w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
    run_dir = tmp_path / "runs" / "vit_h14_jft_tiny"

    def output() -> str:
        return "\n".join(f"--- node {n}\n" + log.read_text()[-2500:] for n, log in enumerate(logs))

    try:
        deadline = time.monotonic() + 180
        while len(read_log(run_dir)) < 3:
            assert all(launcher.poll() is None for launcher in launchers), output()
            assert time.monotonic() < deadline, output()
            time.sleep(0.3)
        (target_file,) = targets.glob("*.json")
        groups = json.loads(target_file.read_text())
        assert groups[0]["targets"] == sorted(f"127.0.0.1:{port}" for port in metrics_ports)
        assert groups[0]["labels"]["vitscale_world_size"] == "2"
        launchers[1].send_signal(signal.SIGUSR1)  # one node only: the ranks agree to stop together
        codes = [launcher.wait(timeout=120) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    assert codes == [EXIT_STOPPED, EXIT_STOPPED], output()
    checkpoint = latest_complete(run_dir)
    assert checkpoint is not None and int(checkpoint.name.split("_")[-1]) == read_log(run_dir)[-1]["step"]
    assert list(targets.glob("*.json")) == []
