"""Fused attention for ViT shapes in Triton: forward and backward, never an N x N matrix in memory.

    out = flash_attention(q, k, v)          # q: (B, H, Nq, d), k, v: (B, H, Nk, d); not causal

Laid out as Triton's tutorial 06: jit helpers, pruned autotune configs, kernels, the
`torch.autograd.Function`, one public function. The forward pass streams key/value blocks
through an online softmax (running max and sum in fp32) and saves the log-sum-exp per query row;
the backward pass recomputes the probabilities from it. Two backward kernels (one per key block
for dk/dv, one per query block for dq) avoid atomics, so every output element is written once.

ViT's shapes are awkward: 197, 257 or 577 tokens (masked tails handle any length) and head dim
80 for ViT-H. Triton tiles must be powers of two, so a head dim is split into a power-of-two
part and a tail part (80 = 64 + 16, 96 = 64 + 32): two dots per product instead of one tile
padded to 128, which would waste 37.5% of the compute. fp16/bf16 inputs multiply on tensor cores
with fp32 accumulation; fp32 inputs are allowed and multiplied in full fp32 ("ieee").
Under TRITON_INTERPRET=1 the kernels run on CPU (slowly) for testing, with a fixed tile config.
Reference test (fp64, outputs and gradients): tests/test_kernel_attention.py. Benchmark against
SDPA and flash-attn: `vitscale bench attention`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vitscale.errors import VitscaleError

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2_E = 1.4426950408889634


class UnsupportedAttentionInput(VitscaleError, ValueError):
    """Inputs the fused kernel cannot take; the message names what to change."""


# ---------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter + bf16 only) multiplies in fp32, which is
    exact for bf16 operands: Triton's CPU interpreter computes bf16 dots wrongly."""
    if UPCAST:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b, input_precision=PRECISION)
    return result


@triton.jit
def _load_rows(base, rows, row_ok, stride_row, cols, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
    """(len(rows), len(cols)) tile of a (N, HEAD_DIM) matrix; out-of-range rows/cols read as 0."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0)


@triton.jit
def _store_rows(base, tile, rows, row_ok, stride_row, cols, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_COLS:
        tl.store(ptrs, tile, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, tile, mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Autotune configs, pruned for ViT: 197-785 tokens, head dims 32-128.


def _fwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                                 (64, 64, 4, 2), (32, 64, 4, 3), (128, 128, 8, 2)]]


def _bwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 4),
                                 (128, 64, 8, 2), (64, 128, 8, 2)]]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles longer than the sequence (pure padding) and big tiles for big head dims
    (they spill registers); keep at least one config."""
    n_q, n_kv = named_args["N_Q"], named_args["N_KV"]
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))  # constexprs come as keywords
    limit_q, limit_kv = max(16, triton.next_power_of_2(n_q)), max(16, triton.next_power_of_2(n_kv))
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= limit_q and c.kwargs["BLOCK_N"] <= limit_kv
            and not (head_dim > 64 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)]
    return kept or configs[-1:]


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _attn_fwd(Q, K, V, Out, LSE, qk_scale,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              H, N_Q, N_KV, HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head), streaming over all keys."""
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B x H x N x d passes 2^31 at eval batch sizes
    batch, head = bh // H, bh % H
    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_Q
    dims_a = tl.arange(0, DIM_A)
    qa = _load_rows(q_base, rows, row_ok, stride_qn, dims_a, HEAD_DIM, False)  # (BLOCK_M, DIM_A)
    acc_a = tl.zeros([BLOCK_M, DIM_A], dtype=tl.float32)
    if DIM_B > 0:
        dims_b = DIM_A + tl.arange(0, DIM_B)
        qb = _load_rows(q_base, rows, row_ok, stride_qn, dims_b, HEAD_DIM, True)  # (BLOCK_M, DIM_B)
        acc_b = tl.zeros([BLOCK_M, DIM_B], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                # running sum of exp2
    for start_n in range(0, N_KV, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N_KV
        ka = _load_rows(k_base, cols, col_ok, stride_kn, dims_a, HEAD_DIM, False)  # (BLOCK_N, DIM_A)
        scores = _dot(qa, tl.trans(ka), PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N)
        if DIM_B > 0:
            kb = _load_rows(k_base, cols, col_ok, stride_kn, dims_b, HEAD_DIM, True)
            scores += _dot(qb, tl.trans(kb), PRECISION, UPCAST)
        scores = tl.where(col_ok[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        va = _load_rows(v_base, cols, col_ok, stride_vn, dims_a, HEAD_DIM, False)
        acc_a = acc_a * alpha[:, None] + _dot(p.to(va.dtype), va, PRECISION, UPCAST)
        if DIM_B > 0:
            vb = _load_rows(v_base, cols, col_ok, stride_vn, dims_b, HEAD_DIM, True)
            acc_b = acc_b * alpha[:, None] + _dot(p.to(vb.dtype), vb, PRECISION, UPCAST)
        m_i = m_new
    o_base = Out + batch * stride_ob + head * stride_oh
    _store_rows(o_base, (acc_a / l_i[:, None]).to(Out.dtype.element_ty), rows, row_ok, stride_on, dims_a,
                HEAD_DIM, False)
    if DIM_B > 0:
        _store_rows(o_base, (acc_b / l_i[:, None]).to(Out.dtype.element_ty), rows, row_ok, stride_on, dims_b,
                    HEAD_DIM, True)
    tl.store(LSE + bh * N_Q + rows, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                   H, N_Q, N_KV, HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """One program: dk, dv for BLOCK_N keys of one (batch, head), streaming over all queries.
    DO, DK, DV are contiguous (B, H, N, d); the stride_o* arguments are DO's, kept for symmetry."""
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B x H x N x d passes 2^31 at eval batch sizes
    batch, head = bh // H, bh % H
    q_base = Q + batch * stride_qb + head * stride_qh
    do_base = DO + bh * N_Q * HEAD_DIM
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_KV
    dims_a = tl.arange(0, DIM_A)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    ka = _load_rows(k_base, cols, col_ok, stride_kn, dims_a, HEAD_DIM, False)  # (BLOCK_N, DIM_A)
    va = _load_rows(v_base, cols, col_ok, stride_vn, dims_a, HEAD_DIM, False)
    dk_a = tl.zeros([BLOCK_N, DIM_A], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, DIM_A], dtype=tl.float32)
    if DIM_B > 0:
        dims_b = DIM_A + tl.arange(0, DIM_B)
        kb = _load_rows(k_base, cols, col_ok, stride_kn, dims_b, HEAD_DIM, True)
        vb = _load_rows(v_base, cols, col_ok, stride_vn, dims_b, HEAD_DIM, True)
        dk_b = tl.zeros([BLOCK_N, DIM_B], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, DIM_B], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < N_Q
        qa = _load_rows(q_base, rows, row_ok, stride_qn, dims_a, HEAD_DIM, False)  # (BLOCK_M, DIM_A)
        doa = _load_rows(do_base, rows, row_ok, HEAD_DIM, dims_a, HEAD_DIM, False)
        scores_t = _dot(ka, tl.trans(qa), PRECISION, UPCAST)  # (BLOCK_N, BLOCK_M)
        dp_t = _dot(va, tl.trans(doa), PRECISION, UPCAST)
        if DIM_B > 0:
            qb = _load_rows(q_base, rows, row_ok, stride_qn, dims_b, HEAD_DIM, True)
            dob = _load_rows(do_base, rows, row_ok, HEAD_DIM, dims_b, HEAD_DIM, True)
            scores_t += _dot(kb, tl.trans(qb), PRECISION, UPCAST)
            dp_t += _dot(vb, tl.trans(dob), PRECISION, UPCAST)
        lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N_Q + rows, mask=row_ok, other=0.0)
        p_t = tl.math.exp2(scores_t * qk_scale - lse[None, :])
        p_t = tl.where(col_ok[:, None] & row_ok[None, :], p_t, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])  # d(loss)/d(scores), before the scale
        dv_a += _dot(p_t.to(doa.dtype), doa, PRECISION, UPCAST)
        dk_a += _dot(ds_t.to(qa.dtype), qa, PRECISION, UPCAST)
        if DIM_B > 0:
            dv_b += _dot(p_t.to(dob.dtype), dob, PRECISION, UPCAST)
            dk_b += _dot(ds_t.to(qb.dtype), qb, PRECISION, UPCAST)
    out_offset = bh * N_KV * HEAD_DIM
    _store_rows(DK + out_offset, (dk_a * sm_scale).to(DK.dtype.element_ty), cols, col_ok, HEAD_DIM, dims_a,
                HEAD_DIM, False)
    _store_rows(DV + out_offset, dv_a.to(DV.dtype.element_ty), cols, col_ok, HEAD_DIM, dims_a, HEAD_DIM, False)
    if DIM_B > 0:
        _store_rows(DK + out_offset, (dk_b * sm_scale).to(DK.dtype.element_ty), cols, col_ok, HEAD_DIM, dims_b,
                    HEAD_DIM, True)
        _store_rows(DV + out_offset, dv_b.to(DV.dtype.element_ty), cols, col_ok, HEAD_DIM, dims_b, HEAD_DIM, True)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                 H, N_Q, N_KV, HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One program: dq for BLOCK_M queries of one (batch, head), streaming over all keys."""
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B x H x N x d passes 2^31 at eval batch sizes
    batch, head = bh // H, bh % H
    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    do_base = DO + bh * N_Q * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_Q
    dims_a = tl.arange(0, DIM_A)
    qa = _load_rows(q_base, rows, row_ok, stride_qn, dims_a, HEAD_DIM, False)  # (BLOCK_M, DIM_A)
    doa = _load_rows(do_base, rows, row_ok, HEAD_DIM, dims_a, HEAD_DIM, False)
    dq_a = tl.zeros([BLOCK_M, DIM_A], dtype=tl.float32)
    if DIM_B > 0:
        dims_b = DIM_A + tl.arange(0, DIM_B)
        qb = _load_rows(q_base, rows, row_ok, stride_qn, dims_b, HEAD_DIM, True)
        dob = _load_rows(do_base, rows, row_ok, HEAD_DIM, dims_b, HEAD_DIM, True)
        dq_b = tl.zeros([BLOCK_M, DIM_B], dtype=tl.float32)
    lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + rows, mask=row_ok, other=0.0)
    for start_n in range(0, N_KV, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N_KV
        ka = _load_rows(k_base, cols, col_ok, stride_kn, dims_a, HEAD_DIM, False)  # (BLOCK_N, DIM_A)
        va = _load_rows(v_base, cols, col_ok, stride_vn, dims_a, HEAD_DIM, False)
        scores = _dot(qa, tl.trans(ka), PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N)
        dp = _dot(doa, tl.trans(va), PRECISION, UPCAST)
        if DIM_B > 0:
            kb = _load_rows(k_base, cols, col_ok, stride_kn, dims_b, HEAD_DIM, True)
            vb = _load_rows(v_base, cols, col_ok, stride_vn, dims_b, HEAD_DIM, True)
            scores += _dot(qb, tl.trans(kb), PRECISION, UPCAST)
            dp += _dot(dob, tl.trans(vb), PRECISION, UPCAST)
        p = tl.math.exp2(scores * qk_scale - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(ka.dtype)
        dq_a += _dot(ds, ka, PRECISION, UPCAST)
        if DIM_B > 0:
            dq_b += _dot(ds, kb, PRECISION, UPCAST)
    dq_base = DQ + bh * N_Q * HEAD_DIM
    _store_rows(dq_base, (dq_a * sm_scale).to(DQ.dtype.element_ty), rows, row_ok, HEAD_DIM, dims_a,
                HEAD_DIM, False)
    if DIM_B > 0:
        _store_rows(dq_base, (dq_b * sm_scale).to(DQ.dtype.element_ty), rows, row_ok, HEAD_DIM, dims_b,
                    HEAD_DIM, True)


_AUTOTUNE_KEY = ["N_Q", "N_KV", "HEAD_DIM"]
_attn_fwd_tuned = triton.autotune(_fwd_configs(), key=_AUTOTUNE_KEY,
                                  prune_configs_by={"early_config_prune": _prune_configs})(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(_bwd_configs(), key=_AUTOTUNE_KEY,
                                       prune_configs_by={"early_config_prune": _prune_configs})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(_bwd_configs(), key=_AUTOTUNE_KEY,
                                     prune_configs_by={"early_config_prune": _prune_configs})(_attn_bwd_dq)


# ---------------------------------------------------------------------------------------------
# Host side: checks, launches, the autograd.Function.


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """head_dim -> (DIM_A, DIM_B): the largest power of two that fits, plus a power-of-two tile
    (at least 16, a tensor-core dot's minimum) for the rest, masked; DIM_B = 0 when none is left."""
    dim_a = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - dim_a
    return dim_a, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise UnsupportedAttentionInput(f"triton attention: {name} must be a 4-D tensor (B, H, N, d), got "
                                            f"{getattr(t, 'shape', type(t).__name__)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedAttentionInput(f"triton attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, "
                                        f"{v.dtype}); cast them to one of fp16, bf16, fp32")
    if q.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedAttentionInput(f"triton attention: dtype {q.dtype} is not supported; use fp16, bf16 or fp32")
    if not (q.device == k.device == v.device):
        raise UnsupportedAttentionInput(f"triton attention: q, k, v are on different devices "
                                        f"({q.device}, {k.device}, {v.device}); move them to one GPU")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and INTERPRETING):
        raise UnsupportedAttentionInput(f"triton attention needs a CUDA GPU, got {q.device} (set "
                                        "model.attention_backend=sdpa on CPU, or TRITON_INTERPRET=1 to test the "
                                        "kernel on CPU, slowly)")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise UnsupportedAttentionInput(f"triton attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                        f"v {tuple(v.shape)} do not match as (B, H, Nq, d), (B, H, Nk, d) x2")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % 8:
        raise UnsupportedAttentionInput(f"triton attention: head dim {head_dim} is not supported; it must be a "
                                        f"multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (use sdpa otherwise)")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise UnsupportedAttentionInput("triton attention: empty sequence (N = 0)")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _interpreter_block(n: int) -> int:
    """Fixed tiles on CPU: the smallest power of two covering the sequence, 16 to 64."""
    return min(64, max(16, triton.next_power_of_2(n)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 dots


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def attention_forward(q, k, v, scale: float, *, out=None, lse=None):
    """Launch the forward kernel. `out` (B, H, Nq, d) and `lse` (B, H, Nq) fp32 may be given
    (tests pass NaN-filled buffers to prove every element is written). Returns (out, lse)."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device) if lse is None else lse
    assert out.is_contiguous() and lse.is_contiguous()
    dim_a, dim_b = split_head_dim(head_dim)
    args = (q, k, v, out, lse, scale * LOG2_E, *_strides(q, k, v, out), heads, n_q, n_kv)
    meta = dict(HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, PRECISION=_dot_precision(q.dtype),
                UPCAST=INTERPRETING and q.dtype == torch.bfloat16)
    if INTERPRETING:
        block = _interpreter_block(max(n_q, n_kv))
        _attn_fwd[(triton.cdiv(n_q, block), batch * heads)](*args, **meta, BLOCK_M=block, BLOCK_N=block)
    else:
        grid = lambda config: (triton.cdiv(n_q, config["BLOCK_M"]), batch * heads)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)
    return out, lse


def attention_backward(q, k, v, out, lse, grad_out, scale: float, *, dq=None, dk=None, dv=None):
    """Gradients of softmax(q k^T * scale) v. Returns contiguous (dq, dk, dv)."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    grad_out = grad_out.contiguous()
    # delta_i = sum_d out_id * dout_id = sum_j p_ij dp_ij: the softmax backward's row term.
    delta = (out.float() * grad_out.float()).sum(-1).contiguous()  # (B, H, Nq)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    dim_a, dim_b = split_head_dim(head_dim)
    common = (scale, scale * LOG2_E, *_strides(q, k, v, grad_out), heads, n_q, n_kv)
    meta = dict(HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, PRECISION=_dot_precision(q.dtype),
                UPCAST=INTERPRETING and q.dtype == torch.bfloat16)
    if INTERPRETING:
        block = _interpreter_block(max(n_q, n_kv))
        blocks = dict(BLOCK_M=block, BLOCK_N=block)
        _attn_bwd_dkdv[(triton.cdiv(n_kv, block), batch * heads)](q, k, v, grad_out, lse, delta, dk, dv, *common,
                                                                  **meta, **blocks)
        _attn_bwd_dq[(triton.cdiv(n_q, block), batch * heads)](q, k, v, grad_out, lse, delta, dq, *common,
                                                              **meta, **blocks)
    else:
        grid_kv = lambda config: (triton.cdiv(n_kv, config["BLOCK_N"]), batch * heads)  # noqa: E731
        grid_q = lambda config: (triton.cdiv(n_q, config["BLOCK_M"]), batch * heads)  # noqa: E731
        _attn_bwd_dkdv_tuned[grid_kv](q, k, v, grad_out, lse, delta, dk, dv, *common, **meta)
        _attn_bwd_dq_tuned[grid_q](q, k, v, grad_out, lse, delta, dq, *common, **meta)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, ctx.scale)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Nq, d), k and v (B, H, Nk, d); scale defaults to d^-0.5.
    Differentiable in q, k and v. Raises UnsupportedAttentionInput (one clear line) otherwise."""
    check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise UnsupportedAttentionInput(f"triton attention: scale must be finite, got {scale}")
    return FlashAttentionFunction.apply(q, k, v, scale)
