"""Position embeddings: none, learned 1-D, learned 2-D (X and Y halves), fixed 2-D sin-cos, and
learned relative position bias; plus resampling of learned ones to a new patch grid.

Fine-tuning at a higher resolution keeps the patch size, so the grid grows (224/16=14 -> 384/16=24)
and learned embeddings are interpolated in 2-D; the [class] token's embedding is left alone.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitscale.model.config import ResampleMethod


class NoPositionEmbedding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LearnedPositionEmbedding1D(nn.Module):
    """One learned vector per token position, [class] (if any) first: (1, extra + grid*grid, D)."""

    def __init__(self, grid: int, width: int, extra_tokens: int):
        super().__init__()
        self.grid, self.extra_tokens = grid, extra_tokens
        self.weight = nn.Parameter(torch.randn(1, extra_tokens + grid * grid, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class LearnedPositionEmbedding2D(nn.Module):
    """Paper's 2-D variant: learned Y and X tables of D/2 each, concatenated per patch."""

    def __init__(self, grid: int, width: int, extra_tokens: int):
        super().__init__()
        self.grid, self.extra_tokens = grid, extra_tokens
        self.rows = nn.Parameter(torch.randn(grid, width // 2) * 0.02)
        self.cols = nn.Parameter(torch.randn(grid, width // 2) * 0.02)
        self.extra = nn.Parameter(torch.randn(1, extra_tokens, width) * 0.02) if extra_tokens else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        grid = torch.cat([self.rows[:, None, :].expand(g, g, -1), self.cols[None, :, :].expand(g, g, -1)], dim=-1)
        table = rearrange(grid, "h w d -> 1 (h w) d")
        if self.extra is not None:
            table = torch.cat([self.extra, table], dim=1)
        return x + table


class SinCosPositionEmbedding2D(nn.Module):
    """Fixed 2-D sin-cos (no parameters); extra tokens get zeros."""

    def __init__(self, grid: int, width: int, extra_tokens: int, temperature: float = 10_000.0):
        super().__init__()
        self.grid, self.extra_tokens = grid, extra_tokens
        self.register_buffer("table", sincos_2d(grid, width, extra_tokens, temperature), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table.to(x.dtype)


def sincos_2d(grid: int, width: int, extra_tokens: int, temperature: float = 10_000.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    # big_vision's (MoCo v3) frequencies, 1 down to 1/temperature, so its checkpoints convert exactly.
    omega = 1.0 / temperature ** (torch.arange(width // 4, dtype=torch.float32) / max(width // 4 - 1, 1))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.cat([torch.zeros(extra_tokens, width), table])[None]


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by the 2-D offset between patches (as in BEiT/Swin), added to
    the attention logits. A [class] token gets three learned entries: to, from and to itself."""

    def __init__(self, grid: int, heads: int, extra_tokens: int):
        super().__init__()
        self.grid, self.extra_tokens = grid, extra_tokens
        span = 2 * grid - 1
        self.table = nn.Parameter(torch.zeros(span * span + (3 if extra_tokens else 0), heads))
        self.register_buffer("index", relative_index(grid, extra_tokens), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return rearrange(self.table[self.index.flatten()], "(i j) h -> h i j", i=n, j=n)


def relative_index(grid: int, extra_tokens: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]) + (grid - 1)  # (2, N, N) in [0, 2g-2]
    index = delta[0] * (2 * grid - 1) + delta[1]
    if not extra_tokens:
        return index
    span = (2 * grid - 1) ** 2
    n = grid * grid + extra_tokens
    full = torch.empty(n, n, dtype=torch.long)
    full[extra_tokens:, extra_tokens:] = index
    full[:extra_tokens, extra_tokens:] = span      # [class] -> patch
    full[extra_tokens:, :extra_tokens] = span + 1  # patch -> [class]
    full[:extra_tokens, :extra_tokens] = span + 2  # [class] -> [class]
    return full


def build_position_embedding(kind: str, grid: int, width: int, heads: int, extra_tokens: int) -> nn.Module:
    """The module added to the token sequence; `relative` adds nothing there (its bias lives in
    each attention layer), so it returns the identity."""
    if kind in ("none", "relative"):
        return NoPositionEmbedding()
    if kind == "learned_1d":
        return LearnedPositionEmbedding1D(grid, width, extra_tokens)
    if kind == "learned_2d":
        return LearnedPositionEmbedding2D(grid, width, extra_tokens)
    if kind == "sincos_2d":
        return SinCosPositionEmbedding2D(grid, width, extra_tokens)
    raise ValueError(f"unknown position embedding {kind!r}")


# ---------------------------------------------------------------------------------------------
# Resampling to a new grid.


RESAMPLE_METHODS = get_args(ResampleMethod)


def _interpolate_2d(image: torch.Tensor, size: int, method: str) -> torch.Tensor:
    if method == "bicubic_antialias":
        return F.interpolate(image, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    if method == "bicubic":
        return F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
    if method == "bilinear_corners":
        return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=True)
    raise ValueError(f"unknown position-embedding resampling {method!r}; choose one of {RESAMPLE_METHODS}")


def resample_grid(table: torch.Tensor, new_grid: int, method: str = "bicubic_antialias") -> torch.Tensor:
    """(grid*grid, D) -> (new_grid*new_grid, D), interpolated over the 2-D grid in fp32."""
    old_grid = int(round(table.shape[0] ** 0.5))
    assert old_grid * old_grid == table.shape[0], "table is not a square grid"
    if old_grid == new_grid:
        return table
    image = rearrange(table, "(h w) d -> 1 d h w", h=old_grid).float()
    return rearrange(_interpolate_2d(image, new_grid, method), "1 d h w -> (h w) d").to(table.dtype)


def resample_1d_embedding(weight: torch.Tensor, extra_tokens: int, new_grid: int,
                          method: str = "bicubic_antialias") -> torch.Tensor:
    """(1, extra + g*g, D) -> (1, extra + new*new, D), leaving the [class] embedding alone."""
    extra, grid = weight[:, :extra_tokens], weight[0, extra_tokens:]
    return torch.cat([extra, resample_grid(grid, new_grid, method)[None]], dim=1)


def resample_axis(table: torch.Tensor, new_size: int, method: str = "bicubic_antialias") -> torch.Tensor:
    """(g, D) -> (new, D) along one axis (learned_2d's X or Y table): linear, with the end
    entries kept in place for bilinear_corners."""
    if table.shape[0] == new_size:
        return table
    line = rearrange(table, "g d -> 1 d g").float()
    line = F.interpolate(line, size=new_size, mode="linear", align_corners=method == "bilinear_corners")
    return rearrange(line, "1 d g -> g d").to(table.dtype)


def resample_relative_table(table: torch.Tensor, old_grid: int, new_grid: int, extra_tokens: int,
                            method: str = "bicubic_antialias") -> torch.Tensor:
    """The (2g-1)^2 offset table resampled like a grid of embeddings; the [class] entries are kept."""
    span_old, span_new = 2 * old_grid - 1, 2 * new_grid - 1
    offsets, extra = table[: span_old * span_old], table[span_old * span_old:]
    if span_old != span_new:
        image = rearrange(offsets, "(h w) n -> 1 n h w", h=span_old).float()
        image = _interpolate_2d(image, span_new, method)
        offsets = rearrange(image, "1 n h w -> (h w) n").to(table.dtype)
    return torch.cat([offsets, extra]) if extra_tokens else offsets
