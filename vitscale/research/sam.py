"""SAM (Foret et al., ICLR 2021) and GSAM (Zhuang et al., ICLR 2022) as a gradient transformation.

Per micro-batch, with clean gradient g = grad f(w):

    rho_t   = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)   (GSAM; SAM: rho)
    w_adv   = w + rho_t * g / ||g||                       ascend to the worst nearby point
    g_adv   = grad f(w_adv)                               SAM's update direction
    g_perp  = g - <g, g_adv/||g_adv||> g_adv/||g_adv||    part of g orthogonal to g_adv
    update  = g_adv - alpha * g_perp                      GSAM (alpha = 0 is SAM)

GSAM's descent along g_adv lowers the perturbed loss f_p; the -alpha * g_perp term lowers the
surrogate gap h = f_p - f without changing f_p to first order. This is big_vision's
`gsam_gradient` (google-research/big_vision, trainers/proj/gsam), including its per-replica
perturbation: each rank perturbs with its own micro-batch gradient ("m-sharpness"), and only the
final update direction is averaged over ranks, by the engine's ordinary backward.

The update direction reaches the base optimizer (AdamW or SGD, with clipping, accumulation, ZeRO
partitioning and loss scaling untouched) as the gradient of the surrogate scalar
sum_p <p, update_p> backpropagated through the engine: its gradient w.r.t. each p is update_p.

ZeRO stages: 0, 1 and 2 keep the full (bf16/fp32) module weights on every rank, so the two
local gradients come from torch.autograd.grad and the perturbation is an in-place edit restored
from a copy. Both passes must call the bare module (`engine.module`): a DeepSpeed engine's own
forward arms its gradient reduction, which belongs to the final surrogate backward only. ZeRO-3
shards the weights: a rank holds 1/world of each tensor and gathers it only inside a module's
forward, so neither an in-place perturbation of the full tensor nor a local
full gradient exists there; it is rejected by `check_sharpness_aware_config`. fp16 is rejected
too: the two extra gradients would be taken without DeepSpeed's dynamic loss scale and
underflow; bf16 and fp32 need no scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

LossFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class SharpnessSettings:
    """rho_max/rho_min follow the learning rate between lr_max and lr_min; alpha is GSAM's."""

    rho_max: float
    rho_min: float
    alpha: float
    lr_max: float
    lr_min: float

    def rho(self, lr: float) -> float:
        if math.isclose(self.lr_max, self.lr_min):
            return self.rho_max
        rho = self.rho_min + (self.rho_max - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)
        # Warmup can start below the final lr (end_lr_ratio > 0): never below rho_min, never negative.
        return min(max(rho, self.rho_min), self.rho_max)


def settings_from_config(config) -> SharpnessSettings:
    """From the whole config tree: optim.name sam (constant rho, alpha 0) or gsam."""
    optim = config.optim
    lr_min = optim.lr * config.schedule.end_lr_ratio
    if optim.name == "sam":
        return SharpnessSettings(optim.rho, optim.rho, 0.0, optim.lr, lr_min)
    rho_min = optim.rho if optim.rho_min is None else optim.rho_min
    return SharpnessSettings(optim.rho, rho_min, optim.alpha, optim.lr, lr_min)


# ---------------------------------------------------------------------------------------------


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 for reductions (bf16 weights), fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((_wide(t) ** 2).sum() for t in tensors))


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((_wide(x) * _wide(y)).sum() for x, y in zip(a, b))


def _gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class _ReplayRng:
    """Both passes must see the same function: same dropout / drop-path / corruption draws."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def sharpness_aware_gradients(loss_fn: LossFn, params: Sequence[torch.Tensor], *, rho: float, alpha: float,
                              eps: float = 1e-12) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The GSAM (alpha > 0) or SAM (alpha = 0) update direction for `params`, from two forward and
    backward passes of `loss_fn` (which reads the parameters in place). Parameters are restored
    exactly. Returns (update per parameter, stats with the clean and perturbed losses)."""
    params = list(params)
    rng = _ReplayRng(params[0].device)
    clean_loss = loss_fn()
    g_clean = _gradients(clean_loss, params)
    clean_norm = _global_norm(g_clean)
    scale = rho / (clean_norm + eps)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, g_clean):
                p.add_(g.to(p.dtype), alpha=float(scale))
        rng.replay()
        perturbed_loss = loss_fn()
        g_adv = _gradients(perturbed_loss, params)
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)
    update = g_adv
    if alpha:
        adv_norm = _global_norm(g_adv)
        projection = _dot(g_clean, g_adv) / (adv_norm + eps)  # <g, g_adv/||g_adv||>
        update = []
        for g, ga in zip(g_clean, g_adv):
            g_perp = _wide(g) - projection * _wide(ga) / (adv_norm + eps)
            update.append((_wide(ga) - alpha * g_perp).to(ga.dtype))
    clean, perturbed = clean_loss.detach().float().item(), perturbed_loss.detach().float().item()
    return update, {"loss": clean, "perturbed_loss": perturbed, "surrogate_gap": perturbed - clean,
                    "rho": rho, "clean_grad_norm": clean_norm.item()}


def surrogate_loss(params: Sequence[torch.Tensor], update: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_p <p, u_p> with u constant: its gradient w.r.t. p is u_p. Backpropagating it through
    an engine puts `update` where the engine expects gradients (reduction, accumulation, clipping)."""
    return sum((p * u.detach().to(p.dtype)).sum() for p, u in zip(params, update))


def sharpness_aware_backward(loss_fn: LossFn, params: Sequence[torch.Tensor], backward: Callable[[torch.Tensor], None],
                             *, rho: float, alpha: float) -> dict[str, float]:
    """One micro-batch: compute the SAM/GSAM direction locally, then hand it to `backward`
    (`engine.backward` for DeepSpeed, `Tensor.backward` for plain PyTorch)."""
    params = [p for p in params if p.requires_grad]
    update, stats = sharpness_aware_gradients(loss_fn, params, rho=rho, alpha=alpha)
    backward(surrogate_loss(params, update))
    return stats


class SharpnessAwareBackward:
    """optim.name=sam|gsam as the loop's gradient method (vitscale.objectives.Backward)."""

    def __init__(self, settings: SharpnessSettings):
        self.settings = settings

    def __call__(self, engine, objective, images: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor | None = None, *, boundary: bool) -> torch.Tensor:
        lr = engine.param_groups[0]["lr"]
        losses: list[torch.Tensor] = []

        def loss_fn() -> torch.Tensor:
            # The bare module: an engine forward arms DeepSpeed's gradient reduction, which must
            # run only for the final backward of the SAM/GSAM direction.
            with engine.autocast():
                losses.append(objective.loss(engine.module, images, targets, weights)[0])
            return losses[-1]

        sharpness_aware_backward(loss_fn, list(engine.module.parameters()),
                                 lambda surrogate: engine.backward(surrogate, boundary=boundary),
                                 rho=self.settings.rho(lr), alpha=self.settings.alpha)
        return losses[0]  # the clean loss f(w), as big_vision logs it; losses[1] is f(w + e)


def build_backward(config) -> SharpnessAwareBackward:
    return SharpnessAwareBackward(settings_from_config(config))
