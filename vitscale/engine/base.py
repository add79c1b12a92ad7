"""The engine boundary: what the training loop may ask of DeepSpeed, FSDP2 or one plain process.

    engine = build_engine(config, model, comm, resume)      # vitscale/engine/__init__.py
    with engine.autocast():
        loss = objective.loss(engine.train_module, images, targets)[0]
    engine.backward(loss, boundary=last_micro_batch)     # the engine scales by 1/accumulation
    outcome = engine.step(skip=nonfinite_loss)           # device flags, no host sync
    engine.save(path) / engine.save_async(path) / engine.load(path, saved_world_size=N)

Each implementation owns backward, the optimizer step (skipped on every rank when `skip` or a
non-finite gradient says so: decided on the device, applied by the fused optimizer's
`found_inf`), its communication (`engine.comm` carries every control-plane collective), its
checkpoint files, and the full fp32 training state. The loop never touches a framework's
internals; nothing framework-specific crosses this line.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from vitscale.engine.distributed import Communicator


@dataclass
class StepOutcome:
    """What one optimizer step did, left on the device until the loop needs it."""

    skipped: torch.Tensor              # bool scalar, equal on every rank
    grad_norm: torch.Tensor | None     # global gradient norm before clipping (None: not computed)


class Engine(Protocol):
    kind: str
    comm: Communicator
    device: torch.device
    input_dtype: torch.dtype           # images are cast to this before the forward
    module: nn.Module                  # the bare model: evaluation, few-shot, SAM's local passes
    train_module: nn.Module            # what the training forward calls (may arm gradient hooks)
    param_groups: list[dict]           # the optimizer's groups (learning rate, weight decay)
    saved_files: list[Path]            # the files this rank wrote in its last save (manifest)

    def autocast(self) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """Accumulate d(loss / accumulation); `boundary`: the last micro-batch of the step."""

    def step(self, skip: torch.Tensor) -> StepOutcome:
        """The optimizer step after the boundary micro-batch, a no-op everywhere when `skip`
        (same on every rank) or any gradient is non-finite; gradients are cleared."""

    def save(self, path: Path) -> str | None:
        """This rank's part of the model and optimizer state into `path`, each file listed in
        `saved_files`; the failure as text (every rank still returns, so the verdict can be agreed)."""

    def save_async(self, path: Path) -> Future:
        """`save`, blocking only while this rank's state is copied to host memory; the files are
        then written in the background. The future resolves to the failure text (None: every
        file written and fsync'd, listed in `saved_files`). One save in flight at a time: the
        caller waits for it before the next save or load."""

    def load(self, path: Path, *, saved_world_size: int) -> None:
        """Model and optimizer state from `path`, written by `saved_world_size` ranks."""

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {"fp32": master weight, optimizer state name: tensor}} gathered in
        full (a collective: every rank calls it); what resharding must preserve bit for bit."""


def set_learning_rate(engine: Engine, lr: float) -> None:
    for group in engine.param_groups:
        group["lr"] = lr
