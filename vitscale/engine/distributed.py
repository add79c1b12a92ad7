"""Process-group plumbing of the main job: where this process sits, starting the group, and the
small collectives the loop agrees with (stop requests, skip decisions, checkpoint verdicts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from vitscale.engine import faults


@dataclass(frozen=True)
class Launch:
    """Where this process sits, from the launcher's environment (torchrun, deepspeed, srun)."""

    rank: int
    local_rank: int
    world_size: int
    job_id: str

    @staticmethod
    def from_environment(local_rank_arg: int | None = None) -> "Launch":
        env = os.environ
        if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
            # srun started the ranks directly (no torchrun): translate Slurm's variables.
            env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_NTASKS", "1")
            env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        return Launch(rank=int(env.get("RANK", "0")), local_rank=local, world_size=int(env.get("WORLD_SIZE", "1")),
                      job_id=env.get("SLURM_JOB_ID", ""))


def init_distributed(config, launch: Launch) -> torch.device:
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    quiet_library_logs()
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu:
        # DeepSpeed's shared-memory all-reduce serves inference only; skipping it saves a JIT
        # compile at start-up and keeps every collective under gloo's timeout.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        accelerator.set_device(launch.local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else accelerator.communication_backend_name(),
                               timeout=timedelta(seconds=config.engine.collective_timeout_seconds),
                               auto_mpi_discovery=False)
    return torch.device(accelerator.current_device_name())


def quiet_library_logs() -> None:
    """DeepSpeed logs every internal step at INFO; the engine prints its own progress lines."""
    import logging
    import warnings

    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    # Our optimizers are torch's AdamW / SGD (plus a skip guard), which ZeRO partitions like any other.
    deepspeed_logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce(values: list[float], op=None) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    faults.maybe_inject("collective")
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    return all_reduce([1.0 if flag else 0.0], dist.ReduceOp.MAX)[0] > 0
