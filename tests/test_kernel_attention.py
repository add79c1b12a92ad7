"""The Triton fused attention against an fp64 reference: outputs and dq, dk, dv.

Runs under TRITON_INTERPRET=1 on CPU (set here if unset; `make test` sets it too), or on a GPU.
Output buffers are pre-filled with NaN so an element the kernels forget to write fails the test.
Sequence lengths are chosen off the tile sizes (1, 17, 197, 257) so masked tails are exercised.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import vitscale.kernels.triton_attention as fa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not fa.INTERPRETING:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 at import time", allow_module_level=True)

# Max |error| allowed against fp64 math on the same (rounded) inputs, per input dtype. The kernel
# accumulates in fp32 either way; low precision enters where p and dS are rounded to the input
# dtype before their matmuls (as in every flash attention), so bf16 (8 mantissa bits) is loosest.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def reference(q, k, v, grad_out, scale):
    """softmax(q k^T scale) v and its gradients in fp64 autograd."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.softmax(q64 @ k64.transpose(-1, -2) * scale, dim=-1) @ v64
    out.backward(grad_out.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def random_inputs(batch, heads, n_q, n_kv, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, head_dim, generator=generator).to(DEVICE, dtype)  # noqa: E731
    return make(n_q), make(n_kv), make(n_kv), make(n_q)


def nan_like(t, dtype=None):
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


def check_against_reference(n_q, n_kv, head_dim, dtype, heads=2, seed=0):
    q, k, v, grad_out = random_inputs(1, heads, n_q, n_kv, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    out, lse = fa.attention_forward(q, k, v, scale, out=nan_like(q), lse=nan_like(q[..., 0], torch.float32))
    dq, dk, dv = fa.attention_backward(q, k, v, out, lse, grad_out, scale,
                                       dq=nan_like(q), dk=nan_like(k), dv=nan_like(v))
    expected = reference(q, k, v, grad_out, scale)
    expected_lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    torch.testing.assert_close(lse.double() / fa.LOG2_E, expected_lse,
                               atol=1e-4 if dtype == torch.float32 else 1e-2, rtol=0)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected):
        assert not got.isnan().any(), f"{name} has unwritten (NaN) elements"
        torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("tokens", [1, 17, 197, 257])
def test_matches_fp64_reference(tokens, head_dim, dtype):
    check_against_reference(tokens, tokens, head_dim, dtype, seed=tokens * head_dim)


def test_queries_and_keys_of_different_lengths():
    """One probe query over all tokens, as in a MAP head."""
    check_against_reference(1, 65, 64, torch.float32)
    check_against_reference(40, 3, 48, torch.float16)


def test_autograd_function_on_strided_inputs():
    """The public function on q, k, v sliced out of one fused qkv tensor, as the model makes them."""
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 33, 3, 2, 80, generator=generator).to(DEVICE).requires_grad_()  # (B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d), non-contiguous
    out = fa.flash_attention(q, k, v)
    grad_out = torch.randn(out.shape, generator=generator).to(DEVICE)
    out.backward(grad_out)
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = qkv64.permute(2, 0, 3, 1, 4).unbind(0)
    expected = torch.softmax(q64 @ k64.transpose(-1, -2) * 80 ** -0.5, dim=-1) @ v64
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, **TOLERANCES[torch.float32])


def test_custom_scale():
    q, k, v, _ = random_inputs(1, 1, 17, 17, 32, torch.float32, 4)
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.05, dim=-1) @ v.double()
    torch.testing.assert_close(fa.flash_attention(q, k, v, scale=0.05).double(), expected,
                               **TOLERANCES[torch.float32])


def test_head_dim_split_never_pads_to_the_next_power_of_two():
    assert fa.split_head_dim(80) == (64, 16)
    assert fa.split_head_dim(96) == (64, 32)
    assert fa.split_head_dim(64) == (64, 0)
    assert fa.split_head_dim(40) == (32, 16)  # 8 masked columns, not 24


@pytest.mark.parametrize("make,message", [
    (lambda: [torch.zeros(1, 1, 4, 32, dtype=torch.float64)] * 3, "dtype torch.float64"),
    (lambda: [torch.zeros(1, 1, 4, 12)] * 3, "head dim 12"),
    (lambda: [torch.zeros(1, 4, 32)] * 3, "4-D"),
    (lambda: [torch.zeros(1, 2, 4, 32), torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32)], "do not match"),
    (lambda: [torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32, dtype=torch.float16),
              torch.zeros(1, 1, 4, 32)], "dtypes differ"),
])
def test_host_side_checks(make, message):
    with pytest.raises(fa.UnsupportedAttentionInput, match=message):
        fa.flash_attention(*make())


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fa, "INTERPRETING", False)
    with pytest.raises(fa.UnsupportedAttentionInput, match="needs a CUDA GPU"):
        fa.check_inputs(*[torch.zeros(1, 1, 4, 32)] * 3)


def test_autotune_space_is_pruned_for_short_sequences():
    """Tiles longer than the sequence are pure padding; big tiles are dropped for big head dims."""
    short = fa._prune_configs(fa._bwd_configs(), {"N_Q": 17, "N_KV": 17}, HEAD_DIM=64)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in short} == {(32, 32)}
    vit_h = fa._prune_configs(fa._fwd_configs(), {"N_Q": 257, "N_KV": 257}, HEAD_DIM=80)
    assert vit_h and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in vit_h)
    assert len(fa._prune_configs(fa._fwd_configs(), {"N_Q": 577, "N_KV": 577}, HEAD_DIM=64)) == len(fa._fwd_configs())


@pytest.mark.skipif(DEVICE != "cpu", reason="a 4 GB address range is cheap only on the CPU (untouched pages)")
def test_offsets_past_2_to_the_31_elements_are_64_bit():
    """Finding: `batch * stride` in int32 wrapped once an evaluation batch passed 2^31 elements
    (H/14 at 392 px, >= 713 images) and the kernel read and wrote elsewhere. Three images 2^30
    elements apart in one 4 GB buffer: the third starts at element 2^31. Only the pages of the
    three images are ever touched."""
    n, d, gap = 17, 64, 1 << 30
    buffer = torch.empty(2 * gap + n * d, dtype=torch.float16)
    q = buffer.as_strided((3, 1, n, d), (gap, n * d, d, 1))
    generator = torch.Generator().manual_seed(0)
    for image in range(3):
        q[image].copy_(torch.randn(1, n, d, generator=generator))
    out, _ = fa.attention_forward(q, q, q, d ** -0.5, out=nan_like(q.contiguous()),
                                  lse=torch.full((3, 1, n), float("nan")))
    for image in range(3):
        x = q[image, 0].double()
        want = torch.softmax(x @ x.T * d ** -0.5, -1) @ x
        torch.testing.assert_close(out[image, 0].double(), want, **TOLERANCES[torch.float16])
