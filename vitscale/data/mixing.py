"""Mixup and CutMix (AugReg options) on a normalised batch with soft targets.

Each batch pairs image i with image B-1-i (the flipped batch, as timm does). With both options
on, each batch uses one of them with equal probability. Targets become float (B, num_classes).
"""

from __future__ import annotations

import numpy as np
import torch


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    if targets.dtype == torch.int64:
        return torch.nn.functional.one_hot(targets, num_classes).float()
    return targets


def mix_batch(images: torch.Tensor, targets: torch.Tensor, *, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) float, targets (B,) int64 or (B, C) float -> mixed images, (B, C) float."""
    targets = soft_targets(targets, num_classes)
    modes = [m for m, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not modes:
        return images, targets
    mode = modes[int(rng.integers(len(modes)))]
    lam = float(rng.beta(mixup_alpha, mixup_alpha) if mode == "mixup" else rng.beta(cutmix_alpha, cutmix_alpha))
    partner = images.flip(0)
    if mode == "mixup":
        images = images * lam + partner * (1 - lam)
    else:
        images, lam = _paste_box(images, partner, lam, rng)
    return images, targets * lam + targets.flip(0) * (1 - lam)


def _paste_box(images: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator):
    """Paste a box of area (1 - lam) from the partner; lam is corrected for clipping at edges."""
    height, width = images.shape[-2:]
    cut = np.sqrt(1 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - box_h // 2, cy + box_h // 2], 0, height)
    left, right = np.clip([cx - box_w // 2, cx + box_w // 2], 0, width)
    images = images.clone()
    images[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (height * width)
