"""`auto` attention backend: per device and shape, the backend `vitscale bench attention` measured
fastest on this machine, else a safe default.

    vitscale bench attention --save-choices          # writes the choices file (see choices_path)
    VITSCALE_ATTENTION_CHOICES=/path/choices.json    # point training at another one

The choices file holds one entry per measured (device, dtype, heads, tokens, head dim) with the
milliseconds of each backend, forward and forward+backward. A call is matched on device name,
dtype and head dim, then to the entry with the nearest token count; training calls (q requires
grad) rank by forward+backward time, inference by forward time. Without a matching entry: SDPA,
which lets torch pick among its own flash/cuDNN/memory-efficient kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from pathlib import Path

import torch

CHOICES_ENV = "VITSCALE_ATTENTION_CHOICES"
DEFAULT_BACKEND = "sdpa"
FORMAT_VERSION = 1


def choices_path() -> Path:
    override = os.environ.get(CHOICES_ENV)
    if override:
        return Path(override)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache_home / "vitscale" / "attention_choices.json"


def device_label(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on this device (math is the reference, always there)."""
    return ["math", "sdpa", *(_installed_gpu_backends() if device.type == "cuda" else ())]


@functools.cache
def _installed_gpu_backends() -> tuple[str, ...]:
    """Looked up once per process: `auto` asks on every attention call, and the import-system
    search (~30 us per package) does not change during a run."""
    return tuple(backend for backend, package in (("triton", "triton"), ("flash", "flash_attn"))
                 if importlib.util.find_spec(package) is not None)


@functools.lru_cache(maxsize=4)
def _read_entries(path: str, mtime: float) -> tuple[dict, ...]:
    """Entries of a choices file; cached per (path, mtime) so a rewritten file is re-read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ()
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        return ()
    return tuple(e for e in data.get("entries", []) if isinstance(e, dict))


def load_choices(path: Path | None = None) -> tuple[dict, ...]:
    path = choices_path() if path is None else path
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return ()
    return _read_entries(str(path), mtime)


def save_choices(entries: list[dict], path: Path | None = None) -> Path:
    """Merge measured entries into the choices file (a new measurement replaces the same key)."""
    path = choices_path() if path is None else path
    key = lambda e: (e["device"], e["dtype"], e["heads"], e["tokens"], e["head_dim"])  # noqa: E731
    merged = {key(e): e for e in load_choices(path)}
    merged.update({key(e): e for e in entries})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": FORMAT_VERSION, "entries": list(merged.values())}, indent=1))
    tmp.replace(path)
    return path


def choose_backend(entries, *, device: str, dtype: str, head_dim: int, tokens: int, training: bool,
                   usable: list[str]) -> str | None:
    """The fastest usable backend of the nearest matching entry, or None without one."""
    matching = [e for e in entries if e.get("device") == device and e.get("dtype") == dtype
                and e.get("head_dim") == head_dim]
    if not matching:
        return None
    nearest = min(matching, key=lambda e: abs(math.log(max(e.get("tokens", 1), 1) / max(tokens, 1))))
    timings = nearest.get("fwd_bwd_ms" if training else "fwd_ms") or {}
    ranked = sorted((ms, name) for name, ms in timings.items() if name in usable and ms and ms > 0)
    return ranked[0][1] if ranked else None


def preferred_backend(q: torch.Tensor) -> str:
    """The backend `auto` uses for q (B, H, N, d): measured fastest, else SDPA; never fails."""
    return preferred_backend_for(q.device, str(q.dtype).removeprefix("torch."), head_dim=q.shape[-1],
                                 tokens=q.shape[-2], training=q.requires_grad)


def preferred_backend_for(device: torch.device, dtype: str, *, head_dim: int, tokens: int, training: bool) -> str:
    usable = [b for b in available_backends(device) if b != "math"]
    choice = choose_backend(load_choices(), device=device_label(device), dtype=dtype, head_dim=head_dim,
                            tokens=tokens, training=training, usable=usable)
    # The kernel's fp32 path has no tensor cores (and spills): fp32 goes to SDPA unless a config
    # asks for triton by name.
    if choice == "triton" and dtype not in ("float16", "bfloat16"):
        choice = None
    return choice or DEFAULT_BACKEND
