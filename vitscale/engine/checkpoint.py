"""Atomic, resumable checkpoints: the engine's state plus everything needed to resume exactly.

    RUN_DIR/checkpoints/step_00001000/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   engine.kind=deepspeed
        dcp/                           engine.kind=fsdp2 | local (torch Distributed Checkpoint)
        rank_00000.pt ...              per rank: data loader position and every RNG state
        trainer.json                   step, skip counters, world size, engine kind, ZeRO stage
        config.yaml                    the resolved config tree
        manifest_rank_00000.json ...   per rank: size and checksum of each file it wrote (manifest.py)
        COMPLETE                       written by rank 0 only after every rank finished writing

A directory without COMPLETE (a process killed mid-write, a full disk) is never chosen by
`latest_complete`, and retention never deletes the newest complete checkpoint. Every file is
written to a temporary name, fsync'd and renamed. Loading never unpickles arbitrary objects:
`torch.load(weights_only=True)` with an allowlist of DeepSpeed's plain state classes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vitscale.errors import CheckpointError

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_DIR_PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def read_complete(path: Path) -> dict[str, Any]:
    """The COMPLETE marker's record ({} when unreadable: the marker's presence is what counts)."""
    try:
        data = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def complete_checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    return [path for _, path, done in reversed(list_checkpoints(run_dir)) if done]


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, directory, complete) for every step_XXXXXXXX directory, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_DIR_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child, is_complete(child)))
    return sorted(found)


def latest_complete(run_dir: str | Path) -> Path | None:
    """The newest checkpoint directory whose COMPLETE marker exists, or None."""
    complete = complete_checkpoints_newest_first(run_dir)
    return complete[0] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest complete checkpoint) or one complete checkpoint directory."""
    path = Path(path)
    if is_complete(path):
        return path
    if (path / "checkpoints").is_dir() or path.name == "checkpoints":
        found = latest_complete(path.parent if path.name == "checkpoints" else path)
        if found is not None:
            return found
        raise CheckpointError(f"{path} holds no complete checkpoint (none has a {COMPLETE_MARKER} marker)")
    if path.is_dir():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker: the save was "
                              "interrupted); pass the run directory to pick its latest complete checkpoint")
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a checkpoint: pass a checkpoint directory "
                              "(RUN_DIR/checkpoints/step_XXXXXXXX) or a run directory (its latest complete one)")
    raise CheckpointError(f"checkpoint {path} not found")


# ---------------------------------------------------------------------------------------------
# Writing: atomic files, the marker, retention.


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then fsync and rename, so `path` is either absent or whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        from vitscale.engine import faults

        faults.maybe_inject("checkpoint_write", path=path)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def torch_save_atomic(obj: Any, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def mark_complete(path: Path, info: dict[str, Any]) -> None:
    write_json(path / COMPLETE_MARKER, {**info, "completed_at": time.time()})
    _fsync_directory(path)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def apply_retention(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete directories
    older than the newest complete one (left by interrupted saves). Returns what was deleted."""
    entries = list_checkpoints(run_dir)
    complete = [path for _, path, done in entries if done]
    if not complete:
        return []
    keep = set(complete[-max(1, keep_last):])
    newest_step = int(CHECKPOINT_DIR_PATTERN.match(complete[-1].name).group(1))
    doomed = [path for step, path, done in entries
              if (done and path not in keep) or (not done and step < newest_step)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------
# Safe DeepSpeed file I/O.


def deepspeed_safe_globals() -> list[Any]:
    """The plain classes DeepSpeed puts in its state files (enums, loss-scaler records, slice
    addresses); allowlisted for `weights_only` loading so nothing else can be unpickled."""
    found: list[Any] = []
    for module_name, names in (("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                               ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                               ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
                               ("deepspeed.runtime.config", ("DeepSpeedConfig",))):
        with contextlib.suppress(ImportError):
            module = __import__(module_name, fromlist=list(names))
            found.extend(getattr(module, name) for name in names if hasattr(module, name))
    return found


_torch_load = torch.load  # the real one, also while torch_load_weights_only() patches torch.load


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint file {path}: {first_line[:200]}") from None


@contextlib.contextmanager
def torch_load_weights_only():
    """Within this block every torch.load (also inside DeepSpeed's zero_to_fp32) is a
    weights_only load with the DeepSpeed allowlist."""
    original = torch.load

    def load(path, map_location=None, **kwargs):
        return safe_torch_load(path, map_location=map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ---------------------------------------------------------------------------------------------
# RNG state as tensors and plain values (loadable with weights_only).


def rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_state_path(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


def part_problem(path: Path, rank: int, world_size: int, saved_world_size: int) -> str | None:
    """What is wrong with the checkpoint files `rank` will read, before anything is loaded (so a
    damaged part stops every rank at once instead of leaving peers in a collective): missing or
    cut short. torch.save files are zip archives whose directory is at the end, so a cut one has
    none; DCP shards must cover every byte range their metadata names."""
    from vitscale.engine.torch_state import DCP_DIR

    if saved_world_size == world_size:
        files = [rank_state_path(path, rank)]
        files += [f for f in sorted(path.glob("*.pt")) if f"rank_{rank}_" in f.name or f.name.startswith("mp_rank_")]
    else:  # resharded: rank 0's data position and every old rank's skip counts are read
        files = [rank_state_path(path, r) for r in range(saved_world_size)] if rank == 0 else []
    for file in files:
        problem = torch_file_problem(file)
        if problem:
            return problem
    dcp = path / DCP_DIR
    if rank == 0 and dcp.is_dir():
        return dcp_problem(dcp)
    return None


def torch_file_problem(file: Path) -> str | None:
    if not file.is_file():
        return f"checkpoint file {file} is missing"
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"checkpoint file {file} is damaged or cut short ({error})"
    return None


def dcp_problem(directory: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # noqa: BLE001 - any unreadable metadata is the same verdict
        return f"checkpoint metadata {directory / '.metadata'} is unreadable ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            return f"checkpoint file {file} is missing"
        if file.stat().st_size < size:
            return f"checkpoint file {file} is cut short ({file.stat().st_size} of {size} bytes)"
    return None
