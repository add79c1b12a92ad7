"""The engine boundary (base.py) and its implementations: deepspeed (default), fsdp2, local.

    comm = start_process_group(config, launch)
    engine = build_engine(config, model, comm, ds_config=ds, saved_world_size=N or None)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitscale.lazy import lazy_attributes

if TYPE_CHECKING:  # torch loads with the first engine, not with vitscale.engine.config
    from torch import nn

    from vitscale.engine.base import Engine
    from vitscale.engine.distributed import Communicator

_LAZY = {"Engine": "vitscale.engine.base", "StepOutcome": "vitscale.engine.base",
         "set_learning_rate": "vitscale.engine.base", "Communicator": "vitscale.engine.distributed",
         "Launch": "vitscale.engine.distributed", "start_process_group": "vitscale.engine.distributed",
         "parallelize": "vitscale.engine.parallelize"}

__all__ = [*_LAZY, "build_engine"]

__getattr__ = lazy_attributes(__name__, _LAZY)


def build_engine(config, model: nn.Module, comm: Communicator, *, ds_config: dict[str, Any] | None = None,
                 saved_world_size: int | None = None) -> Engine:
    """The engine engine.kind names, around `model` (already parallelized); `saved_world_size`:
    the world size of the checkpoint this job will resume from, if any."""
    from vitscale.engine.parallelize import parallelize

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
