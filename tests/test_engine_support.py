"""Helpers for the engine's multi-process tests: start 2 ranks of vitscale/train.py on CPU with
gloo (each rank its own process, so tests can signal or kill one), read the run log, and a
deterministic synthetic loader for comparing ZeRO stages with a single process.

The ranks are started directly with the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), exactly what torchrun gives them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "vitscale" / "train.py"

# A ViT small enough that DeepSpeed's start-up dominates: 16x16 digits, 4x4 patches, 2 blocks.
TINY = ["model.name=Ti/4", "model.image_size=16", "model.depth=2", "model.width=32", "model.heads=2",
        "model.mlp_dim=64", "model.num_classes=10", "model.representation_size=null",
        "model.attention_backend=math", "engine.precision=fp32", "engine.micro_batch_size=8",
        "engine.global_batch_size=16", "engine.eval_every=0", "engine.checkpoint_every=0",
        "engine.collective_timeout_seconds=60", "engine.watchdog_seconds=120", "metrics.port=0",
        "data.num_workers=0", "data.shuffle_buffer=64", "schedule.warmup_steps=2", "run.log_every=1"]


@pytest.fixture(scope="session")
def engine_digits(tmp_path_factory):
    """(train pattern, eval pattern) of the digits at 16 px."""
    from vitscale.data.datasets import write_digits_shards

    return write_digits_shards(tmp_path_factory.mktemp("engine_digits"), image_size=16, samples_per_shard=200)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_args(run_dir: Path, shards: tuple[str, str], *extra: str, eval_shards: bool = False) -> list[str]:
    """The tiny job's arguments; an override in `extra` replaces the default of the same key (the
    command line refuses a key given twice)."""
    overrides = [*TINY, f"data.train_shards={shards[0]}", f"run.output_dir={run_dir.parent}",
                 f"run.name={run_dir.name}"]
    if eval_shards:
        overrides.append(f"data.eval_shards={shards[1]}")
    return ["--config", str(REPO / "configs" / "demo.yaml"), *merge_overrides(overrides, extra)]


def merge_overrides(base, extra) -> list[str]:
    """KEY=VALUE items of `base`, each replaced by the same key's item in `extra`; other items of
    `extra` (new keys, flags such as --ds_config PATH) follow in order."""
    keys = {item.split("=", 1)[0] for item in extra if "=" in item and not item.startswith("-")}
    return [item for item in base if item.split("=", 1)[0] not in keys] + list(extra)


class Ranks:
    """Processes of one job; stdout/stderr of rank r in run_dir/../rank{r}.{out,err}."""

    def __init__(self, args: list[str], *, world_size: int = 2, script: Path = TRAIN, env: dict | None = None,
                 logs: Path):
        port = free_port()
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        for rank in range(world_size):
            rank_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": str(rank),
                        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {})}
            out = open(logs / f"rank{rank}.out", "w")
            err = open(logs / f"rank{rank}.err", "w")
            self.procs.append(subprocess.Popen([sys.executable, str(script), *args], env=rank_env, stdout=out,
                                               stderr=err, cwd=REPO))

    def wait(self, timeout: float = 240, stop_on_first_failure: bool = False) -> list[int]:
        """Exit codes; with stop_on_first_failure, a rank that dies makes the others get
        SIGKILL after 3 s, as torchrun's agent does."""
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(proc.poll() is None for proc in self.procs):
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"job did not end within {timeout} s:\n{self.output()}")
            if stop_on_first_failure and failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 3:
                self.kill()
            time.sleep(0.05)
        return [proc.returncode for proc in self.procs]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()

    def output(self, rank: int | None = None) -> str:
        ranks = range(len(self.procs)) if rank is None else [rank]
        text = []
        for r in ranks:
            for kind in ("out", "err"):
                path = self.logs / f"rank{r}.{kind}"
                if path.exists():
                    text.append(f"--- rank {r} std{kind} ---\n" + path.read_text()[-4000:])
        return "\n".join(text)

    def stderr(self, rank: int) -> str:
        return (self.logs / f"rank{rank}.err").read_text()


def run_job(args: list[str], logs: Path, *, world_size: int = 2, timeout: float = 240, expect: int | None = 0,
            stop_on_first_failure: bool = False, **kwargs) -> Ranks:
    job = Ranks(args, world_size=world_size, logs=logs, **kwargs)
    codes = job.wait(timeout, stop_on_first_failure)
    if expect is not None:
        assert codes == [expect] * world_size, f"exit codes {codes}\n{job.output()}"
    job.codes = codes
    return job


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


def module_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from vitscale.engine.checkpoint import safe_torch_load

    return safe_torch_load(checkpoint / "mp_rank_00_model_states.pt")["module"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
