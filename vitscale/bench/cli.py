"""`vitscale bench`: sub-benchmarks that print a table and write JSON.

    vitscale bench attention [--quick] [--save-choices]   # TFLOP/s per attention backend at ViT shapes
    vitscale bench train --model B/16 [--modes eager]     # vitscale vs timm train steps, images/s, MFU
    vitscale bench data ...                               # the input pipeline (vitscale.data.bench)
    vitscale bench replay [--samples N --world-size R]    # resume replay time and memory at scale
    vitscale bench zero-memory [--stages 0,1,2,3]         # ZeRO bytes per parameter per rank vs theory
    vitscale bench checkpoint [--model B/16 --dir DIR]    # save/verify/load GB/s vs raw sequential I/O
    vitscale bench device [--dry-run] --out DIR           # the GPU bring-up check (scripts/device_check.sh)
    vitscale bench all [--quick]                          # all of them with their defaults

Benchmarks are never run as timed assertions in tests; numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from pathlib import Path

SUB_BENCHMARKS = {
    "attention": ("vitscale.bench.attention", "TFLOP/s of each attention backend at ViT shapes"),
    "train": ("vitscale.bench.train", "full train steps: vitscale vs timm, eager and compiled"),
    "data": ("vitscale.data.bench", "input pipeline throughput (shards -> decoded batches)"),
    "replay": ("vitscale.data.replay_bench", "resume after a topology change: replay time and memory at scale"),
    "checkpoint": ("vitscale.bench.checkpoint",
                   "checkpoint save / verify / load GB/s vs the directory's raw write and read"),
    "device": ("vitscale.bench.device",
               "the GPU bring-up check: kernel vs fp64, attention and train-step speed, MFU, a real job"),
    "zero-memory": ("vitscale.bench.zero_memory", "per-rank model-state bytes per parameter of ZeRO-0..3 vs theory"),
}


def _module(name: str):
    module_name = SUB_BENCHMARKS[name][0]
    if importlib.util.find_spec(module_name) is None:
        return None
    return importlib.import_module(module_name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (_, help_text) in SUB_BENCHMARKS.items():
        sub = benches.add_parser(name, help=help_text, description=help_text)
        module = _module(name)
        if module is not None:
            module.add_arguments(sub)
    everything = benches.add_parser("all", help="every benchmark above but device, with its defaults")
    everything.add_argument("--quick", action="store_true", help="small shapes and few steps (CPU smoke run)")
    everything.add_argument("--json-dir", default="runs/bench", help="one JSON file per benchmark goes here")


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "all":
        return run_all(args)
    module = _module(args.benchmark)
    if module is None:
        print(f"vitscale bench {args.benchmark}: not available in this installation "
              f"({SUB_BENCHMARKS[args.benchmark][0]} is missing)")
        return 2
    return int(module.run(args) or 0)


def default_arguments(name: str, settings: dict[str, object]) -> argparse.Namespace | None:
    """A sub-benchmark's own defaults, with each of `settings` applied where it has that option
    (e.g. `quick`, or `json` / `output` for the results file); None when it is not installed or
    needs arguments we cannot guess."""
    module = _module(name)
    if module is None:
        return None
    parser = argparse.ArgumentParser(prog=f"vitscale bench {name}", exit_on_error=False)
    module.add_arguments(parser)
    try:
        args = parser.parse_args([])
    except (argparse.ArgumentError, SystemExit):
        return None
    for key, value in settings.items():
        if hasattr(args, key):
            setattr(args, key, value)
    return args


# `all --quick`: settings per sub-benchmark that make it a smoke run of seconds on a CPU.
QUICK_SETTINGS: dict[str, dict[str, object]] = {
    "attention": {},
    "train": dict(model="Ti/16", batch_size=4, steps=3, warmup=1, modes="eager"),
    "data": dict(images=16, sizes="imagenet", repeats=1),
    "replay": dict(samples=1_000_000, world_size=256, baseline_samples=100_000),
    "zero-memory": dict(model="Ti/16", stages="2", steps=1),
    "checkpoint": dict(model="Ti/16", repeats=1),
}


def run_all(args: argparse.Namespace) -> int:
    status = 0
    for name in SUB_BENCHMARKS:
        if name == "device":
            continue  # a whole machine check of its own (scripts/device_check.sh), not a benchmark
        print(f"\n== vitscale bench {name} ==")
        results = str(Path(args.json_dir) / f"{name}.json")
        settings: dict[str, object] = dict(json=results, output=results, quick=args.quick)
        if args.quick:
            settings.update(QUICK_SETTINGS[name])
        sub_args = default_arguments(name, settings)
        if sub_args is None:
            print(f"skipped: {SUB_BENCHMARKS[name][0]} is missing or needs arguments; run `vitscale bench {name} -h`")
            continue
        try:
            status = max(status, int(_module(name).run(sub_args) or 0))
        except Exception as error:  # one broken benchmark must not hide the others' results
            print(f"vitscale bench {name} failed: {type(error).__name__}: {error}")
            status = 1
    return status
