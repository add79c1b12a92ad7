"""The Triton kernels compile for an H100 (sm_90) on this GPU-less machine: Triton's compiler runs
on the CPU. fp16/bf16 products must use tensor cores and the tiles must fit shared memory."""

import json
import os
import subprocess
import sys


def test_kernels_compile_for_h100_with_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-m", "vitscale.kernels.compile_check", "--arch", "90",
                                "--cases", "bf16:80,fp16:64,fp32:96"], env=env, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:] + completed.stdout[-2000:]
    results = json.loads(completed.stdout)
    assert {(r["kernel"], r["dtype"]) for r in results} == {
        (k, d) for k in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq") for d in ("bf16", "fp16", "fp32")}
    for result in results:
        assert result["ptx_chars"] > 0 and result["fits_shared_memory"], result
        if result["dtype"] != "fp32":  # fp32 is multiplied exactly ("ieee"), off the tensor cores
            assert result["tensor_core_ops"] > 0, result
