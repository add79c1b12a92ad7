"""`vitscale demo` (make demo): the real main job on CPU, end to end, in a few minutes.

    vitscale demo [--steps 300] [--output-dir runs] [KEY=VALUE ...]

Writes scikit-learn's handwritten digits (real 8x8 scans) as WebDataset shards with a fixed
held-out split into a fresh run folder, then runs launch/local_cpu.sh: a tiny ViT under DeepSpeed
ZeRO-2, 2 processes with gloo, evaluation on the held-out shards, progress lines (step, loss,
images/s, ETA), and finally the held-out accuracy. From an installed wheel (no launch/ beside the
package) it runs the same job with `python -m torch.distributed.run -m vitscale.train` and the
configs installed as `vitscale.configs`, with the environment local_cpu.sh sets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from vitscale.errors import VitscaleError

REPO = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: configs/demo.yaml)")
    parser.add_argument("--output-dir", default="runs", help="parent of the demo's run folder")
    parser.add_argument("--nproc", type=int, default=2, help="CPU processes (ranks)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides")


def run(args: argparse.Namespace) -> int:
    from vitscale.data.datasets import write_digits_shards

    if args.nproc < 1 or (args.steps is not None and args.steps < 1):
        raise VitscaleError("--nproc and --steps must be positive")
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir = Path(args.output_dir) / run_name
    print(f"vitscale demo: writing the digits shards to {run_dir / 'shards'}", flush=True)
    train_pattern, eval_pattern = write_digits_shards(run_dir / "shards", image_size=16, samples_per_shard=128)
    overrides = [f"data.train_shards={train_pattern}", f"data.eval_shards={eval_pattern}",
                 f"run.output_dir={args.output_dir}", f"run.name={run_name}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    command, env = demo_command(args.nproc, overrides)
    print("vitscale demo: " + " ".join(command), flush=True)
    started = time.perf_counter()
    code = subprocess.call(command, env=env)
    minutes = (time.perf_counter() - started) / 60
    accuracy = final_accuracy(run_dir / "log.jsonl")
    if code != 0:
        print(f"vitscale demo: training exited with code {code} after {minutes:.1f} min", file=sys.stderr)
        return code
    if accuracy is None:
        print(f"vitscale demo: no evaluation found in {run_dir / 'log.jsonl'}", file=sys.stderr)
        return 1
    print(f"vitscale demo: held-out accuracy {accuracy:.1%} (top-1 on 360 unseen digits) after "
          f"{minutes:.1f} min; run folder {run_dir}", flush=True)
    return 0


def demo_command(nproc: int, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """launch/local_cpu.sh in a source checkout; its equivalent from an installed wheel."""
    launcher = REPO / "launch" / "local_cpu.sh"
    if launcher.is_file():
        command = [str(launcher), "--config", str(REPO / "configs" / "demo.yaml"), *overrides]
        return command, {**os.environ, "VITSCALE_NPROC": str(nproc), "VITSCALE_PYTHON": sys.executable}
    configs = resources.files("vitscale.configs")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "-m", "vitscale.train", "--ds_config", str(configs / "zero2.json"),
               "--config", str(configs / "demo.yaml"), *overrides]
    return command, {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def final_accuracy(log_path: Path) -> float | None:
    if not log_path.is_file():
        return None
    accuracy = None
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            accuracy = record["eval"].get("top1")
    return accuracy
