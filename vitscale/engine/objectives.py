"""Learning objectives: what a training step minimises. `run.objective` selects one.

    objective = build_objective(config)
    loss, stats = objective.loss(model, images, targets)     # stats: floats for the log

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
    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]: ...


ObjectiveFactory = Callable[[Any], Objective]
_REGISTRY: dict[str, ObjectiveFactory] = {}
# Objectives defined outside the engine, imported on first use: name -> module that registers it.
_PROVIDERS = {"masked_patch": "vitscale.research.masked"}


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


class Classification:
    """Softmax cross-entropy (single label) or sigmoid cross-entropy (multi-label)."""

    def __init__(self, multi_label: bool):
        self.multi_label = multi_label

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(images).float()  # (B, K); the loss in fp32 even under bf16 autocast
        if self.multi_label:
            loss = sigmoid_cross_entropy(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets)
        return loss, {}


def sigmoid_cross_entropy(logits: torch.Tensor, multi_hot: torch.Tensor) -> torch.Tensor:
    """Sum over classes of the binary cross-entropy, mean over images (big_vision's sigmoid_xent)."""
    per_class = F.binary_cross_entropy_with_logits(logits, multi_hot.to(logits.dtype), reduction="none")
    return per_class.sum(dim=-1).mean()


register_objective("classification", lambda config: Classification(config.data.multi_label))
