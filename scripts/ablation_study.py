#!/usr/bin/env python3
"""Rerun the ViT paper's ablations at small scale: configs/ablations/*.yaml on the digits demo data, CPU.

    python scripts/ablation_study.py                                  # every switch, 3 seeds, 300 steps
    python scripts/ablation_study.py --only classifier_token classifier_gap classifier_gap_token_lr
    python scripts/ablation_study.py --seeds 5 --steps 600 --jobs 2 --out runs/study KEY=VALUE ...
    python scripts/ablation_study.py --jobs 2 --table docs/results.md  # regenerates the committed table

Each config trains through the real engine (`vitscale train`, one process, in its own subprocess
so every run starts from a clean process group) once per seed (run.seed: initialisation, data
order and augmentation), on scikit-learn's digits written as shards. Each final checkpoint is
scored on the held-out split: top-1 of the classifier (the engine's evaluation at the end of the
run) and 5-shot linear accuracy of the frozen representation (the paper's quick metric, under
big_vision's protocol). OUT/results.csv gets one row per run; OUT/results.md (and --table) one
row per config with mean +- sample standard deviation over the seeds, and what the config changes
relative to configs/ablations/base.yaml. KEY=VALUE overrides apply to every run. SIGTERM or
Ctrl-C stops the running trainings (each is sent SIGTERM, then killed) and keeps the partial table.

Small-data caveat: on 1,437 training digits the paper's large-data findings (depth helps most,
position embeddings matter little) need not reproduce; the table says what happened here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
RUN_COLUMNS = ("config", "seed", "changes", "params", "steps", "train_loss", "top1", "fewshot_5shot", "seconds")
METRICS = ("top1", "fewshot_5shot", "train_loss")
# Logged steps per run: the train-loss column averages the last tenth of them.
LOG_POINTS = 100
KILL_AFTER_SECONDS = 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="config names (default: every file but base)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="runs per config, with run.seed = 0 .. N-1")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (each gets cores/jobs threads)")
    parser.add_argument("--out", default="runs/ablation_study", help="output directory (relative to the cwd)")
    parser.add_argument("--data", help="where to write the digits shards (default: OUT/digits)")
    parser.add_argument("--table", help="also write the Markdown table here (e.g. docs/results.md)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)
    for name in ("steps", "seeds", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def ablation_configs(only: list[str] | None) -> list[Path]:
    available = {p.stem: p for p in sorted(ABLATIONS.glob("*.yaml")) if p.stem != "base"}
    if not only:
        return list(available.values())
    unknown = [name for name in only if name not in available]
    if unknown:
        raise SystemExit(f"ablation_study: unknown config {unknown[0]!r}; choose from {', '.join(available)}")
    return [available[name] for name in only]


def digits_shards(directory: Path) -> tuple[str, str]:
    """(Re)write the digits shards: deterministic, about a second."""
    from vitscale.data.datasets import write_digits_shards

    return write_digits_shards(directory, image_size=32)


def changes_from_base(path: Path, overrides: list[str]) -> str:
    """The dotted keys (and values) in which this config differs from base.yaml; run.name aside."""
    from vitscale.config import load_config

    base = _flatten(load_config(ABLATIONS / "base.yaml", overrides).to_dict())
    mine = _flatten(load_config(path, overrides).to_dict())
    diff = [f"{key}={mine[key]}" for key in mine if mine[key] != base.get(key) and key != "run.name"]
    return ", ".join(diff) or "(base)"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Children:
    """The running trainings, so that SIGTERM/SIGINT can stop them before the study exits."""

    def __init__(self):
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)

    def _stop(self, signum, frame) -> None:
        self.stopping = True
        for child in list(self.running):
            child.send_signal(signal.SIGTERM)  # vitscale train stops at the next step boundary
        deadline = time.monotonic() + KILL_AFTER_SECONDS
        for child in list(self.running):
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        raise SystemExit(128 + signum)


def train(path: Path, seed: int, overrides: list[str], out: Path, children: Children,
          threads: int) -> tuple[Path, float]:
    """One `vitscale train` run from scratch; returns (its run directory, wall seconds)."""
    import shutil

    from vitscale.config import load_config

    overrides = [*overrides, f"run.seed={seed}", f"run.name={path.stem}_seed{seed}"]
    run_dir = load_config(path, overrides).run.directory
    shutil.rmtree(run_dir, ignore_errors=True)  # a study run always starts fresh
    command = [sys.executable, "-P", "-m", "vitscale", "train", "--config", str(path), *overrides]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": str(threads)}
    log = out / "logs" / f"{path.stem}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        if children.stopping:
            raise SystemExit(1)
        child = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
        children.running.add(child)
        try:
            returncode = child.wait()
        finally:
            children.running.discard(child)
    if returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"ablation_study: {path.name} seed {seed} failed (exit {returncode}); see {log}:\n"
                         + "\n".join(tail))
    return run_dir, time.perf_counter() - started


def score(run_dir: Path, steps: int) -> dict[str, float]:
    """Final training loss (mean over the logged steps of the last tenth of the run), held-out
    top-1, 5-shot accuracy."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    logged = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and "step" in r]
    tail = [loss for step, loss in logged if step > steps - max(1, steps // 10)]
    evals = [r["eval"] for r in records if "eval" in r]
    return {"train_loss": sum(tail) / len(tail) if tail else math.nan,
            "top1": evals[-1].get("top1", math.nan) if evals else math.nan,
            "fewshot_5shot": fewshot(run_dir), "steps": steps}


def fewshot(run_dir: Path) -> float:
    """5-shot linear accuracy of the final checkpoint's frozen representation on the held-out digits."""
    from vitscale.engine.checkpoint import latest_complete
    from vitscale.evaluation.fewshot import FewShotEvaluator
    from vitscale.model import build_model
    from vitscale.interop.export import load_checkpoint_weights

    state, config = load_checkpoint_weights(latest_complete(run_dir))
    model = build_model(config.model)
    model.load_state_dict(state)
    evaluator = FewShotEvaluator(config.data, train_shards=config.data.train_shards,
                                 test_shards=config.data.eval_shards, image_size=config.model.image_size,
                                 num_classes=config.model.num_classes, shots=(5,), micro_batch_size=128,
                                 max_test_images=None)
    return evaluator.evaluate(model)["fewshot_5shot"]


def parameter_count(path: Path, overrides: list[str]) -> int:
    import torch

    from vitscale.config import load_config
    from vitscale.model import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(load_config(path, overrides).model), include_head=False)


def summarise(rows: list[dict]) -> list[dict]:
    """One row per config: mean and sample standard deviation of each metric over its seeds."""
    summary = []
    for config in dict.fromkeys(row["config"] for row in rows):
        runs = [row for row in rows if row["config"] == config]
        entry = {key: runs[0][key] for key in ("config", "changes", "params", "steps")}
        entry["seeds"] = len(runs)
        for metric in METRICS:
            values = [row[metric] for row in runs]
            entry[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan)
        entry["seconds"] = statistics.fmean(row["seconds"] for row in runs)
        summary.append(entry)
    return summary


def write_tables(rows: list[dict], out: Path, header: str, table: Path | None = None) -> Path:
    """OUT/results.csv (every run) and OUT/results.md (+ `table`): mean +- std per config."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    columns = ("config", "changes", "params", "seeds", "top1", "fewshot_5shot", "train_loss", "seconds")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in summarise(rows):
        lines.append("| " + " | ".join(_cell(column, entry[column]) for column in columns) + " |")
    text = header + "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text)
    return out / "results.md"


def _cell(column: str, value) -> str:
    if column == "seconds":
        return f"{value:.0f}"
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    return str(value)


def table_header(args: argparse.Namespace, argv: list[str], threads: int) -> str:
    import torch

    command = " ".join(["python scripts/ablation_study.py", *argv])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    return (f"# Ablations on the digits demo data\n\n"
            f"Generated by `{command}` ({time.strftime('%Y-%m-%d')}; {machine}; {args.jobs} training(s) at once, "
            f"{threads} thread(s) each).\n\n"
            f"Each config trains {args.steps} steps (batch as in configs/ablations/base.yaml) once per seed "
            f"(run.seed 0..{args.seeds - 1}: initialisation, data order, augmentation). Cells are mean ± sample "
            "standard deviation over the seeds. top1: the classifier on the 360 held-out digits (chance 0.100); "
            "fewshot_5shot: 5-shot linear accuracy of the frozen representation under big_vision's protocol "
            "(l2 = 1024, 3 draws); train_loss: mean over the last tenth of the run; seconds: wall time of one "
            "run. 1,437 training digits are not JFT: the paper's large-data findings need not reproduce here.\n\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configs = ablation_configs(args.only)
    out = Path(args.out).resolve()
    table = Path(args.table).resolve() if args.table else None
    train_shards, eval_shards = digits_shards(Path(args.data).resolve() if args.data else out / "digits")
    defaults = {"data.train_shards": train_shards, "data.eval_shards": eval_shards, "run.steps": args.steps,
                "run.log_every": max(1, args.steps // LOG_POINTS), "run.output_dir": out / "runs", "metrics.port": 0}
    given = {item.split("=", 1)[0] for item in args.overrides}
    for key in ("run.steps", "run.seed", "run.name"):
        if key in given:
            raise SystemExit(f"ablation_study: {key} is set by the study (use --steps / --seeds); drop the override")
    overrides = [f"{key}={value}" for key, value in defaults.items() if key not in given] + args.overrides
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    header = table_header(args, argv, threads)
    children = Children()
    children.install()
    rows: list[dict] = []

    def one(path: Path, seed: int) -> dict:
        run_dir, seconds = train(path, seed, overrides, out, children, threads)
        row = {"config": path.stem, "seed": seed, "changes": changes_from_base(path, overrides),
               "params": parameter_count(path, overrides), "seconds": seconds, **score(run_dir, args.steps)}
        print(f"ablation_study: {path.stem} seed {seed}: top-1 {row['top1']:.3f}, 5-shot {row['fewshot_5shot']:.3f}, "
              f"loss {row['train_loss']:.3f} ({seconds:.0f} s)", flush=True)
        return row

    runs = [(path, seed) for path in configs for seed in range(args.seeds)]
    order = {run: index for index, run in enumerate(runs)}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(one, path, seed) for path, seed in runs]
        try:
            for future in futures:
                rows.append(future.result())
                rows.sort(key=lambda row: order[(ABLATIONS / f"{row['config']}.yaml", row["seed"])])
                write_tables(rows, out, header, table)  # a partial table survives an interrupted study
        except BaseException:
            children.stopping = True
            for future in futures:
                future.cancel()
            raise
    markdown = write_tables(rows, out, header, table)
    print(markdown.read_text())
    return 0


if __name__ == "__main__":
    from vitscale.errors import ConfigError

    try:
        sys.exit(main())
    except ConfigError as error:
        sys.exit(f"ablation_study: {error}")
