"""Masked patch prediction: the ViT paper's self-supervised objective (section 4.6, appendix B.1).

    patches (B, N, D) = patch_embed(images)
    corrupt 50% of them per image: 80% -> learnable [mask] embedding, 10% -> another random
        patch's embedding, 10% kept (as BERT's masked language modelling)
    tokens = encoder(corrupted + position embeddings)
    from each corrupted patch's output token predict, by target kind:
        mean_color  its mean colour, 3 bits per channel            one 512-way softmax
        downsized   its 4x4 downsized version, 3-bit colour        16 x 512-way softmax
        full_patch  all its pixels                                 L2 regression

    objective = MaskedPatchObjective(cfg.masked_patch, pixel_mean, pixel_std)
    objective.attach(model)          # adds model.masked_patch (the [mask] embedding + predictor)
    loss, stats = objective.loss(model, images, targets)   # targets (labels) are not used

The extra parameters live in a submodule of the ViT, so whatever optimises and checkpoints the
model (DeepSpeed included) also optimises and checkpoints them; fine-tuning drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitscale.errors import ConfigError
from vitscale.objectives import weighted_mean
from vitscale.research.config import MaskedPatchConfig

# ---------------------------------------------------------------------------------------------
# Corruption of patch embeddings.


@dataclass
class Corruption:
    """Which patches are corrupted and how; all (B, N)."""

    selected: torch.Tensor      # bool: corrupted, i.e. predicted (mask | random | kept)
    masked: torch.Tensor        # bool: replaced by the [mask] embedding
    randomised: torch.Tensor    # bool: replaced by another patch's embedding
    source: torch.Tensor        # long: flat index (b * N + n) of the replacing patch

    @property
    def kept(self) -> torch.Tensor:
        return self.selected & ~self.masked & ~self.randomised


def sample_corruption(batch: int, num_patches: int, *, ratio: float = 0.5, mask_prob: float = 0.8,
                      random_prob: float = 0.1, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> Corruption:
    """Exactly round(ratio * N) patches per image are selected (uniformly, without replacement);
    each selected patch independently is masked / randomised / kept with the given probabilities."""
    count = max(1, round(ratio * num_patches))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # a uniform random permutation per image
    selected = rank < count
    choice = torch.rand(batch, num_patches, device=device, generator=generator)
    masked = selected & (choice < mask_prob)
    randomised = selected & (choice >= mask_prob) & (choice < mask_prob + random_prob)
    # "Another" patch: a non-zero offset from this patch's flat index, anywhere in the batch.
    total = batch * num_patches
    offset = torch.randint(1, max(total, 2), (batch, num_patches), device=device, generator=generator)
    position = torch.arange(total, device=device).view(batch, num_patches)
    source = (position + offset) % total
    return Corruption(selected, masked, randomised, source)


def apply_corruption(embeddings: torch.Tensor, corruption: Corruption, mask_embedding: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, D) with the masked / randomised patches replaced (differentiable)."""
    b, n, d = embeddings.shape
    assert corruption.selected.shape == (b, n), "corruption drawn for another batch shape"
    others = embeddings.reshape(b * n, d)[corruption.source.reshape(-1)].view(b, n, d)
    out = torch.where(corruption.randomised[..., None], others, embeddings)
    return torch.where(corruption.masked[..., None], mask_embedding.to(out.dtype).expand(b, n, d), out)


# ---------------------------------------------------------------------------------------------
# Targets, computed from the un-normalised image in [0, 1].


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P, P, C), patches in the row-major order PatchEmbed uses."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) p q c", p=patch_size, q=patch_size)


def quantize_colors(rgb: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """(..., 3) colours in [0, 1] -> (...) class ids in [0, 2^(3*bits)): r, g, b levels base 2^bits."""
    levels = 2 ** bits
    q = (rgb.clamp(0, 1) * levels).floor().clamp(max=levels - 1).long()
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def mean_color_targets(unit_images: torch.Tensor, patch_size: int, bits: int = 3) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, N) colour class of each patch's mean colour."""
    return quantize_colors(patchify(unit_images, patch_size).mean(dim=(2, 3)), bits)


def downsized_targets(unit_images: torch.Tensor, patch_size: int, size: int = 4, bits: int = 3) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, N, size*size): each patch area-averaged to size x size cells
    (exact block means when size divides the patch; overlapping bins otherwise, e.g. 14 -> 4)."""
    patches = rearrange(patchify(unit_images, patch_size), "b n p q c -> (b n) c p q")
    small = F.adaptive_avg_pool2d(patches, size)  # (B*N, C, size, size)
    cells = rearrange(small, "(b n) c h w -> b n (h w) c", b=unit_images.shape[0])
    return quantize_colors(cells, bits)


def full_patch_targets(unit_images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, N, P*P*3), centred to [-1, 1] so a zero output means grey."""
    return rearrange(patchify(unit_images, patch_size) * 2 - 1, "b n p q c -> b n (p q c)")


# ---------------------------------------------------------------------------------------------
# The extra parameters and the objective.


class MaskedPatchHead(nn.Module):
    """The learnable [mask] embedding and the linear predictor on corrupted patches' outputs."""

    def __init__(self, width: int, out_features: int):
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.zeros(width))
        self.predictor = nn.Linear(width, out_features)
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        nn.init.xavier_uniform_(self.predictor.weight)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.predictor(tokens)


class MaskedPatchObjective:
    """`loss(model, images, targets) -> (loss, stats)` for run.objective=masked_patch."""

    name = "masked_patch"

    def __init__(self, config: MaskedPatchConfig, pixel_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 pixel_std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.config = config
        # The loader normalises images as (x - mean) / std; targets need colours in [0, 1].
        self.pixel_mean = torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.pixel_std = torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1)

    # -- parameters -----------------------------------------------------------------------------
    def output_features(self, patch_size: int, in_channels: int) -> int:
        colours = 2 ** (3 * self.config.color_bits)
        if self.config.target == "mean_color":
            return colours
        if self.config.target == "downsized":
            return self.config.downsized_size ** 2 * colours
        return patch_size * patch_size * in_channels

    def attach(self, model: nn.Module) -> MaskedPatchHead:
        """Register the [mask] embedding and predictor as `model.masked_patch` (before the
        optimizer / DeepSpeed engine is built, so they are optimised and checkpointed)."""
        vit = unwrap_model(model)
        if vit.config.in_channels != 3 and self.config.target != "full_patch":
            raise ConfigError("masked_patch.target", f"{self.config.target} predicts RGB colours but the "
                              f"model has {vit.config.in_channels} input channels", "use full_patch")
        if getattr(vit, "masked_patch", None) is None:
            head = MaskedPatchHead(vit.shape.width, self.output_features(vit.shape.patch_size, vit.config.in_channels))
            param = next(vit.parameters())
            vit.add_module("masked_patch", head.to(device=param.device, dtype=param.dtype))
        return vit.masked_patch

    # -- loss -----------------------------------------------------------------------------------
    def targets(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        unit = (images.float() * self.pixel_std.to(images.device) + self.pixel_mean.to(images.device)).clamp(0, 1)
        cfg = self.config
        if cfg.target == "mean_color":
            return mean_color_targets(unit, patch_size, cfg.color_bits)
        if cfg.target == "downsized":
            return downsized_targets(unit, patch_size, cfg.downsized_size, cfg.color_bits)
        return full_patch_targets(unit, patch_size)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None = None,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        vit = unwrap_model(model)
        head = getattr(vit, "masked_patch", None)
        if head is None:
            raise ConfigError("run.objective", "masked_patch needs its [mask] embedding and predictor on the "
                              "model", "build the model through the engine (it calls objective.attach)")
        cfg, shape = self.config, vit.shape
        corruption = sample_corruption(images.shape[0], shape.num_patches, ratio=cfg.corrupt_ratio,
                                       mask_prob=cfg.mask_prob, random_prob=cfg.random_prob, device=images.device)
        tokens = vit.forward_features(images, patch_transform=lambda x: apply_corruption(x, corruption,
                                                                                         head.mask_embedding))
        outputs = head(tokens[:, vit.extra_tokens:][corruption.selected]).float()  # (M, out)
        wanted = self.targets(images, shape.patch_size)[corruption.selected]         # (M, ...)
        return self._loss_and_stats(outputs, wanted, images.shape[0], weights)

    def _loss_and_stats(self, outputs: torch.Tensor, wanted: torch.Tensor, batch: int,
                        weights: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Every image has the same number of selected patches (M = batch x count, image-major), so
        the mean over an image's elements, weighted over images, is the plain mean without weights."""
        if self.config.target == "full_patch":
            per_image = F.mse_loss(outputs, wanted, reduction="none").reshape(batch, -1).mean(dim=1)
            loss = weighted_mean(per_image, weights)
            return loss, {"loss": loss.item()}
        colours = 2 ** (3 * self.config.color_bits)
        logits = outputs.view(-1, colours)   # downsized: (M * cells, colours)
        labels = wanted.reshape(-1)
        per_image = F.cross_entropy(logits, labels, reduction="none").reshape(batch, -1).mean(dim=1)
        loss = weighted_mean(per_image, weights)
        hits = (logits.argmax(dim=-1) == labels).float().reshape(batch, -1).mean(dim=1)
        accuracy = hits.mean() if weights is None else (hits * (weights > 0)).sum() / (weights > 0).sum().clamp(min=1)
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The VisionTransformer inside a DeepSpeed engine / DDP / torch.compile wrapper (explicitly:
    a DeepSpeed engine would also answer attribute look-ups on the model's behalf)."""
    from vitscale.model import VisionTransformer

    while not isinstance(model, VisionTransformer):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} does not wrap a VisionTransformer")
        model = inner
    return model


def build_masked_patch_objective(config) -> MaskedPatchObjective:
    """From the whole config tree; targets undo the loader's normalisation (data.mean, data.std)."""
    return MaskedPatchObjective(config.masked_patch, config.data.mean, config.data.std)


def _register() -> None:
    from vitscale.objectives import register_objective

    register_objective("masked_patch", build_masked_patch_objective)


_register()
