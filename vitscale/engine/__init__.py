"""The engine boundary (base.py) and its implementations: deepspeed (default), fsdp2, local.

    comm = start_process_group(config, launch)
    engine = build_engine(config, model, comm, ds_config=ds, saved_world_size=N or None)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitscale.engine.base import Engine, StepOutcome, set_learning_rate
from vitscale.engine.distributed import Communicator, Launch, start_process_group
from vitscale.engine.parallelize import parallelize

__all__ = ["Communicator", "Engine", "Launch", "StepOutcome", "build_engine", "parallelize", "set_learning_rate",
           "start_process_group"]


def build_engine(config, model: nn.Module, comm: Communicator, *, ds_config: dict[str, Any] | None = None,
                 saved_world_size: int | None = None) -> Engine:
    """The engine engine.kind names, around `model` (already parallelized); `saved_world_size`:
    the world size of the checkpoint this job will resume from, if any."""
    kind = config.engine.kind
    model = parallelize(model, config)
    if kind == "deepspeed":
        from vitscale.engine.deepspeed import DeepSpeedEngine

        reshard = saved_world_size is not None and saved_world_size != comm.world_size
        return DeepSpeedEngine(config, model, comm, ds_config or {}, universal_resume=reshard)
    if kind == "fsdp2":
        from vitscale.engine.fsdp2 import FSDP2Engine

        return FSDP2Engine(config, model, comm)
    from vitscale.engine.local import LocalEngine

    return LocalEngine(config, model, comm)
