"""Peak dense matmul throughput of known accelerators, for MFU.

    peak_flops(torch.device("cuda"), "bf16", override=None)   # 9.89e14 on an H100 SXM

Numbers are the vendors' dense (no 2:4 sparsity) tensor-core peaks in FLOP/s. A device is matched
by substrings of `torch.cuda.get_device_name()`, most specific first. Unknown devices and CPUs
give None (no MFU) unless the user passes an override (e.g. `engine.peak_tflops`).
"""

from __future__ import annotations

import torch

from vitscale.errors import ConfigError
from vitscale.kernels.selection import device_label

TERA = 1e12
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")

# (name substrings that must all appear, lower case) -> TFLOP/s by precision. Order matters:
# the first match wins, so specific variants (PCIe, NVL) come before the generic name.
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("h100", "pcie"), {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (("h100", "nvl"), {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (("h100",), {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),       # SXM5
    (("h200",), {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (("h800",), {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (("gh200",), {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (("b200",), {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    (("a100",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (("a800",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (("l40s",), {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    (("l40",), {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (("l4",), {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (("a10g",), {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    (("a10",), {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (("a6000",), {"bf16": 155.0, "fp16": 155.0, "tf32": 77.4, "fp32": 38.7}),
    (("v100",), {"bf16": 0.0, "fp16": 125.0, "tf32": 0.0, "fp32": 15.7}),
    (("mi300x",), {"bf16": 1307.0, "fp16": 1307.0, "tf32": 654.0, "fp32": 163.4}),
    (("mi250",), {"bf16": 362.0, "fp16": 362.0, "tf32": 0.0, "fp32": 95.7}),
]


def normalise_precision(precision: str) -> str:
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "32": "fp32"}
    name = aliases.get(precision.lower(), precision.lower())
    if name not in PRECISIONS:
        raise ConfigError("engine.precision", f"unknown precision {precision!r} for MFU",
                          f"use one of {', '.join(PRECISIONS)}")
    return name


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    """TFLOP/s of a device named like torch.cuda.get_device_name() returns, or None."""
    name = device_name.lower()
    precision = normalise_precision(precision)
    for needles, peaks in PEAK_TFLOPS:
        if all(needle in name for needle in needles):
            return peaks[precision] or None
    return None


def peak_flops(device: torch.device, precision: str, override: float | None) -> float | None:
    """FLOP/s peak for MFU. `override` is in FLOP/s and wins; CPUs and unknown GPUs give None."""
    if override is not None:
        if override <= 0:
            raise ConfigError("engine.peak_flops", f"must be positive, got {override}",
                              "give the device's dense peak in FLOP/s, e.g. 9.89e14 for an H100 SXM in bf16")
        return float(override)
    if device.type != "cuda":
        return None
    tflops = lookup_peak_tflops(device_label(device), precision)
    return tflops * TERA if tflops else None
