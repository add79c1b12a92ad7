"""One function for scaled dot-product attention, many backends.

    out = attention(q, k, v, backend="sdpa")   # q, k, v: (B, heads, N, head_dim)

`math` is the einsum reference; `sdpa` is torch's fused SDPA (which itself picks flash,
memory-efficient or cuDNN kernels on GPU); `triton` is vitscale's fused kernel (kernels/);
`flash` is the flash-attn package. `auto` resolves per call from device and shape.
ViT attention is never causal, so no backend takes a causal flag.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from einops import einsum

from vitscale.errors import ConfigError

BACKENDS = ("auto", "math", "sdpa", "triton", "flash")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto",
              bias: torch.Tensor | None = None, dropout_p: float = 0.0,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, shapes (B, H, N, d) -> (B, H, N, d); bias (H, N, N) or None."""
    if backend == "auto":
        backend = resolve_auto_backend(q, has_bias=bias is not None, dropout_p=dropout_p)
    if backend == "math":
        return math_attention(q, k, v, bias=bias, dropout_p=dropout_p, scale=scale)
    if backend == "sdpa":
        mask = bias.to(q.dtype).unsqueeze(0) if bias is not None else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if bias is not None or dropout_p > 0:
        raise ConfigError("model.attention_backend", f"{backend} supports neither attention bias nor "
                          "attention dropout", "use sdpa or math with pos_embed=relative or attention_dropout")
    if backend == "triton":
        from vitscale.kernels import flash_attention

        return flash_attention(q, k, v, scale=scale)
    if backend == "flash":
        return _flash_attn(q, k, v, scale)
    raise ConfigError("model.attention_backend", f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")


def math_attention(q, k, v, *, bias=None, dropout_p=0.0, scale=None):
    """The reference: every intermediate spelled out, in the input dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * scale
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return einsum(probs, v, "b h i j, b h j d -> b h i d")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _flash_attn(q, k, v, scale):
    if not flash_attn_available():
        raise ConfigError("model.attention_backend", "flash needs the flash-attn package and a CUDA GPU",
                          "pip install 'vitscale[flash]' on a GPU machine, or use sdpa/triton")
    from flash_attn import flash_attn_func

    # flash-attn wants (B, N, H, d) and half precision.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)


# `auto`'s choice per (device, dtype, head dim, tokens, training), made once per process: the same
# backend for the whole run (logged by the trainer), and no file look-up on the hot path.
_RESOLVED: dict[tuple, str] = {}


def resolve_auto_backend(q: torch.Tensor, *, has_bias: bool, dropout_p: float) -> str:
    """Pick a backend for this call: for bias/dropout, SDPA; else vitscale's benchmarked
    preference for this device and shape (see `vitscale bench attention`), falling back to SDPA."""
    if has_bias or dropout_p > 0:
        return "sdpa"
    return _auto_backend(q.device.type, q.device.index, str(q.dtype).removeprefix("torch."), q.shape[-1],
                         q.shape[-2], q.requires_grad)


@torch.compiler.assume_constant_result  # traced as its value: no graph break under torch.compile
def _auto_backend(device_type: str, device_index: int | None, dtype: str, head_dim: int, tokens: int,
                  training: bool) -> str:
    key = (device_type, device_index, dtype, head_dim, tokens, training)
    if key not in _RESOLVED:
        from vitscale.kernels.selection import preferred_backend_for

        _RESOLVED[key] = preferred_backend_for(torch.device(device_type, device_index), dtype, head_dim=head_dim,
                                               tokens=tokens, training=training)
    return _RESOLVED[key]


def resolved_backends() -> dict[str, str]:
    """What `auto` chose so far in this process, e.g. {"cuda:0 bfloat16 d=64 n=197 train": "triton"}."""
    return {f"{t}{'' if i is None else f':{i}'} {dtype} d={d} n={n} {'train' if train else 'eval'}": backend
            for (t, i, dtype, d, n, train), backend in _RESOLVED.items()}
