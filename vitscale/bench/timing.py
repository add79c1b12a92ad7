"""Timing and output shared by the sub-benchmarks: interleaved repeats, medians, tables, JSON.

Variants are timed in interleaved rounds (A, B, C, A, B, C, ...) so that a machine whose load
changes during the run (shared CPUs, GPU clocks) slows every variant alike; medians, not means.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(variants: dict[str, Callable[[], object]], *, device: torch.device, warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, `repeats` samples each, after `warmup` untimed calls."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(time_once(fn, device))
    return samples


def measured_gemm_flops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                        repeats: int = 10) -> tuple[int, float]:
    """(n, FLOP/s) of an n x n x n matrix product on `device`: the rate a model's GEMMs can reach
    here, measured in the same run as what is compared with it (8192 on a GPU, 1024 on a CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = median([time_once(lambda: a @ b, device) for _ in range(repeats)])
    return n, 2.0 * n**3 / seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_description(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table, readable in a terminal too."""
    cells = [[_format_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _format_cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
