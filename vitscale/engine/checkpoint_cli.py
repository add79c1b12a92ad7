"""`vitscale checkpoint verify`: check a checkpoint's files against its checksum manifests.

    vitscale checkpoint verify runs/vit_h14/checkpoints/step_00093000     # one checkpoint
    vitscale checkpoint verify runs/vit_h14                               # every complete one, newest first

The same check a resume runs before loading anything (vitscale/engine/manifest.py), in one
process. Exit 0 when every checkpoint named verifies, 2 otherwise; for a run directory it also
says which checkpoint `engine.resume=auto` would take.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vitscale.engine import checkpoint as ckpt
from vitscale.engine import manifest
from vitscale.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check sizes and checksums of every file against the manifests")
    verify.add_argument("path", help="a checkpoint directory (step_XXXXXXXX) or a run directory "
                                     "(all its complete ones)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if ckpt.is_complete(path):
        checkpoints = [path]
    elif ckpt.checkpoints_root(path).is_dir():
        checkpoints = ckpt.complete_checkpoints_newest_first(path)
        if not checkpoints:
            raise CheckpointError(f"{path} holds no complete checkpoint (none has a {ckpt.COMPLETE_MARKER} marker)")
    else:
        ckpt.resolve_checkpoint(path)  # raises the error that names what `path` is instead
        checkpoints = [path]
    good = []
    for checkpoint in checkpoints:
        started = time.perf_counter()
        problems = problems_of(checkpoint)
        seconds = time.perf_counter() - started
        if problems:
            print(f"{checkpoint}: FAILED ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
            for problem in problems:
                print(f"  {problem}")
        else:
            size = sum(entry["bytes"] for entry in expected_files(checkpoint).values())
            print(f"{checkpoint}: ok ({size / 1e6:.1f} MB in {seconds:.2f} s)")
            good.append(checkpoint)
    if len(checkpoints) > 1 or checkpoints[0] != path:
        print(f"engine.resume=auto takes: {good[0] if good else 'none (no checkpoint verifies)'}")
    return 0 if len(good) == len(checkpoints) else 2


def expected_files(checkpoint: Path) -> dict[str, dict]:
    return manifest.read_manifests(checkpoint, _manifest_count(checkpoint)).files


def problems_of(checkpoint: Path) -> list[str]:
    count = _manifest_count(checkpoint)
    if count == 0:
        return [f"{checkpoint} has no checksum manifest (written before manifests existed): nothing to verify"]
    return manifest.verify(checkpoint, count)


def _manifest_count(checkpoint: Path) -> int:
    count = ckpt.read_complete(checkpoint).get("manifests")
    return count if isinstance(count, int) and count > 0 else 0
