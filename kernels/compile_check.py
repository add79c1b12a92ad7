"""Compile the attention kernels ahead of time for a GPU architecture, on any machine (no GPU needed).

    python -m vitscale.kernels.compile_check --arch 90        # H100: PTX, tensor-core ops, shared memory

Triton's compiler (MLIR -> PTX) runs on the CPU, so a machine without a GPU can still prove that
the kernels compile for a real target, that fp16/bf16 products land on tensor cores (mma/wgmma
instructions) and that the tiles fit the architecture's shared memory. Must run without
TRITON_INTERPRET (under the interpreter the kernels are Python functions, not compilable).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vitscale.kernels import triton_attention as fa

POINTERS = ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")
FP32_POINTERS = ("LSE", "DELTA")
FLOATS = ("qk_scale", "sm_scale")
TRITON_TYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
# Largest dynamic shared memory per block (bytes) by compute capability.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def compile_kernel(kernel, *, arch: int, dtype: str, head_dim: int, block_m: int, block_n: int,
                   num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile one kernel specialisation; returns PTX size, tensor-core op count, shared bytes."""
    if fa.INTERPRETING:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    dim_a, dim_b = fa.split_head_dim(head_dim)
    constexprs = dict(HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, BLOCK_M=block_m, BLOCK_N=block_n,
                      PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + TRITON_TYPES[dtype]
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    return dict(kernel=kernel.__name__, arch=arch, dtype=dtype, head_dim=head_dim, block_m=block_m,
                block_n=block_n, ptx_chars=len(ptx), tensor_core_ops=len(re.findall(r"\bwgmma\.|\bmma\.sync", ptx)),
                shared_bytes=compiled.metadata.shared)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    parser.add_argument("--cases", default="bf16:80,fp16:64", help="comma list of DTYPE:HEAD_DIM")
    parser.add_argument("--block", type=int, default=64, help="BLOCK_M = BLOCK_N")
    args = parser.parse_args(argv)
    results = []
    for case in args.cases.split(","):
        dtype, head_dim = case.split(":")
        for kernel in (fa._attn_fwd, fa._attn_bwd_dkdv, fa._attn_bwd_dq):
            results.append(compile_kernel(kernel, arch=args.arch, dtype=dtype, head_dim=int(head_dim),
                                          block_m=args.block, block_n=args.block))
    limit = SHARED_MEMORY_LIMIT.get(args.arch)
    for result in results:
        result["fits_shared_memory"] = limit is None or result["shared_bytes"] <= limit
    print(json.dumps(results, indent=1))
    return 0 if all(r["fits_shared_memory"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
