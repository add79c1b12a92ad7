"""The blocks a ViT is built from; each lives here once."""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from vitscale.model.attention import attention


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D) with one strided convolution
    (equivalent to flattening PxP patches and applying a shared linear map)."""

    def __init__(self, patch_size: int, in_channels: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(images), "b d h w -> b (h w) d")


class MultiHeadAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str, attention_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        self.heads, self.backend, self.attention_dropout = heads, backend, attention_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = attention(q, k, v, backend=self.backend, bias=bias,
                        dropout_p=self.attention_dropout if self.training else 0.0)
        return self.dropout(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescaling the survivors."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class EncoderBlock(nn.Module):
    """Pre-LN (paper): x + f(LN(x)). Post-LN (ablation): LN(x + f(x))."""

    def __init__(self, width: int, mlp_dim: int, heads: int, *, backend: str, norm_position: str,
                 dropout: float, attention_dropout: float, drop_path: float, eps: float,
                 activation: str = "gelu"):
        super().__init__()
        self.pre_norm = norm_position == "pre"
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = MultiHeadAttention(width, heads, backend, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, dropout, activation)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop_path(self.attn(self.norm1(x), bias))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop_path(self.attn(x, bias)))
        return self.norm2(x + self.drop_path(self.mlp(x)))


class AttentionPoolingHead(nn.Module):
    """MAP head (big_vision): a learned probe attends over all tokens, then a residual MLP."""

    def __init__(self, width: int, mlp_dim: int, heads: int, eps: float, activation: str = "gelu"):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = repeat(self.probe, "1 1 d -> b 1 d", b=x.shape[0])
        q = rearrange(self.q(probe), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(x), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        pooled = self.proj(rearrange(attention(q, k, v, backend="sdpa"), "b h n d -> b n (h d)"))
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]
