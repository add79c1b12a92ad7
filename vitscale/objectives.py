"""Learning objectives (what a step minimises) and gradient methods (how a micro-batch's
gradient reaches the engine). `run.objective` and `optim.name` select them.

    objective = build_objective(config)
    loss, stats = objective.loss(model, images, targets, weights)   # stats: floats for the log
    backward = build_backward(config)                               # plain, or SAM / GSAM
    loss = backward(engine, objective, images, targets, weights, boundary=last_micro_batch)

`weights` (B,) are per-sample loss weights: loss = sum_i weights_i x loss_i, with loss_i image i's
own loss (None: the plain mean). The trainer zeroes the loader's holes with them and scales so a
step averages over the real samples of the global batch (vitscale.train.sample_weights).

Built in: "classification", softmax cross-entropy over int64 class ids, or (data.multi_label)
sigmoid cross-entropy over float multi-hot targets, summed over classes and averaged over images,
as the ViT authors trained JFT. Other components add objectives with `register_objective`
(e.g. "masked_patch" from vitscale/research).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.errors import ConfigError


class Objective(Protocol):
    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]: ...

    def attach(self, model: nn.Module) -> None:
        """Add the objective's own parameters to the model before an engine wraps it."""


class Backward(Protocol):
    def __call__(self, engine, objective: Objective, images: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor | None = None, *, boundary: bool) -> torch.Tensor:
        """Forward, backward into the engine; returns the micro-batch's (clean) loss."""


ObjectiveFactory = Callable[[Any], Objective]
_REGISTRY: dict[str, ObjectiveFactory] = {}
# Objectives defined elsewhere, imported on first use: name -> module that registers it.
_PROVIDERS = {"masked_patch": "vitscale.research.masked"}
# Gradient methods other than the plain one: optim.name -> module with `build_backward(config)`.
_BACKWARD_PROVIDERS = {"sam": "vitscale.research.sam", "gsam": "vitscale.research.sam"}


def register_objective(name: str, factory: ObjectiveFactory) -> None:
    """`factory(config) -> Objective`; the name is what run.objective selects."""
    _REGISTRY[name] = factory


def build_objective(config: Any) -> Objective:
    name = config.run.objective
    if name not in _REGISTRY and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])
    if name not in _REGISTRY:
        raise ConfigError("run.objective", f"no objective named {name!r} is available",
                          f"choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](config)


def plain_backward(engine, objective: Objective, images: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor | None = None, *, boundary: bool) -> torch.Tensor:
    from vitscale.engine import faults

    with engine.autocast():
        loss, _ = objective.loss(engine.train_module, images, targets, weights)
    if faults.maybe_inject("loss") == "nan_loss":
        loss = loss * float("nan")
    engine.backward(loss, boundary=boundary)
    return loss


def build_backward(config: Any) -> Backward:
    provider = _BACKWARD_PROVIDERS.get(config.optim.name)
    if provider is None:
        return plain_backward
    return importlib.import_module(provider).build_backward(config)


class Classification:
    """Softmax cross-entropy (single label) or sigmoid cross-entropy (multi-label)."""

    def __init__(self, multi_label: bool):
        self.multi_label = multi_label

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(images).float()  # (B, K); the loss in fp32 even under bf16 autocast
        if self.multi_label:
            per_image = sigmoid_cross_entropy(logits, targets, reduction="none")
        else:
            per_image = F.cross_entropy(logits, targets, reduction="none")
        return weighted_mean(per_image, weights), {}

    def attach(self, model: nn.Module) -> None:
        pass  # no parameters of its own


def sigmoid_cross_entropy(logits: torch.Tensor, multi_hot: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Sum over classes of the binary cross-entropy, mean over images (big_vision's sigmoid_xent)."""
    per_class = F.binary_cross_entropy_with_logits(logits, multi_hot.to(logits.dtype), reduction="none")
    per_image = per_class.sum(dim=-1)
    return per_image if reduction == "none" else per_image.mean()


def weighted_mean(per_image: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum_i weights_i x per_image_i (None: the mean). A zero weight drops its image from the
    loss; the loader fills holes with zeros, so their activations stay finite."""
    if weights is None:
        return per_image.mean()
    weights = weights.to(per_image.device, per_image.dtype)
    return torch.where(weights > 0, per_image * weights, 0.0).sum()


register_objective("classification", lambda config: Classification(config.data.multi_label))
