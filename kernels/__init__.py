"""vitscale's attention kernels (installed as `vitscale.kernels`).

    from vitscale.kernels import flash_attention, preferred_backend
    out = flash_attention(q, k, v)       # (B, H, N, d), Triton, forward + backward
    preferred_backend(q)                 # "triton" / "sdpa" / "flash": fastest measured here

The Triton module is imported lazily so that importing this package never needs Triton.
"""

from __future__ import annotations

from vitscale.kernels.selection import preferred_backend


def flash_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v with vitscale's fused Triton kernel; see kernels/triton_attention.py."""
    from vitscale.kernels.triton_attention import flash_attention as fused

    return fused(q, k, v, scale=scale)


__all__ = ["flash_attention", "preferred_backend"]
