"""engine.kind=local: one process, the plain module and a torch optimizer, no wrapper.

The reference the other engines are compared against: gradient accumulation is loss /
accumulation summed by autograd, clipping is torch's clip_grad_norm_, the step is the fused
AdamW/SGD kernel. bf16 runs the forward under torch.autocast with fp32 weights (the master copy).
FSDP2 (vitscale/engine/fsdp2.py) is this engine with the module sharded.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from vitscale.engine import torch_state
from vitscale.engine.base import StepOutcome
from vitscale.engine.distributed import Communicator
from vitscale.engine.optim import build_optimizer, step_unless
from vitscale.errors import ConfigError


class TorchEngine:
    """Backward, step and checkpoints over a module torch's optimizers can step directly."""

    kind = "local"

    def __init__(self, config, model: nn.Module, comm: Communicator):
        engine = config.engine
        if engine.precision == "fp16":
            raise ConfigError("engine.precision", f"fp16 needs loss scaling, which engine.kind={self.kind} "
                              "does not do", "use bf16 (no scaling needed) or engine.kind=deepspeed")
        self.comm, self.device = comm, comm.device
        self.accumulation = engine.global_batch_size // (engine.micro_batch_size * comm.world_size)
        self.grad_clip = config.optim.grad_clip
        self.precision = engine.precision
        self.module = self.prepare_module(model.to(self.device), config)
        self.train_module = self.module
        self.optimizer = build_optimizer(config.optim, self.module)
        self.input_dtype = torch.float32  # autocast / the mixed-precision policy casts inside
        self.saved_files: list[Path] = []
        self._async_writer: torch_state.RecordingWriter | None = None
        self._background_group = None

    def prepare_module(self, model: nn.Module, config) -> nn.Module:
        return model

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups  # read through: loading a state dict replaces the list

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        (loss / self.accumulation).backward()

    def gradient_norm(self) -> torch.Tensor:
        """Global gradient norm, clipping the gradients to optim.grad_clip when it is set."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def step(self, skip: torch.Tensor) -> StepOutcome:
        norm = self.gradient_norm()
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        skipped = skip.to(norm.device) | ~torch.isfinite(norm)
        step_unless(self.optimizer, skipped)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(skipped=skipped, grad_norm=norm)

    def save(self, path: Path) -> str | None:
        self.saved_files = []
        return torch_state.save_dcp(path, self.module, self.optimizer, self.saved_files)

    def save_async(self, path: Path) -> Future:
        self.saved_files = []
        if self._async_writer is None:  # the first asynchronous save: every rank is here together
            self._async_writer = torch_state.RecordingWriter(path, keep_staging_buffers=self.device.type == "cuda")
            self._background_group = self.comm.new_background_group()
        return torch_state.save_dcp_async(path, self.module, self.optimizer, self.saved_files, self._async_writer,
                                          self._background_group)

    def load(self, path: Path, *, saved_world_size: int) -> None:
        torch_state.load_dcp(path, self.module, self.optimizer)

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return torch_state.full_state(self.module, self.optimizer)


class LocalEngine(TorchEngine):
    kind = "local"

    def __init__(self, config, model: nn.Module, comm: Communicator):
        if comm.world_size > 1:
            raise ConfigError("engine.kind", f"local runs one process, this job has {comm.world_size} ranks",
                              "use engine.kind=deepspeed or fsdp2 for several ranks")
        super().__init__(config, model, comm)
