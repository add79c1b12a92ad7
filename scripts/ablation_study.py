#!/usr/bin/env python3
"""Rerun the ViT paper's ablations at small scale: configs/ablations/*.yaml on the digits demo data, CPU.

    python scripts/ablation_study.py                                  # every switch, 300 steps each
    python scripts/ablation_study.py --only classifier_token classifier_gap classifier_gap_token_lr
    python scripts/ablation_study.py --steps 100 --out runs/ablation_study KEY=VALUE ...

Each config trains through the real engine (`vitscale train`, one process, in its own subprocess
so every run starts from a clean process group), on scikit-learn's digits written as shards. The
final checkpoint is then scored on the held-out split: top-1 of the classifier (the engine's
evaluation at the end of the run) and 5-shot linear accuracy of the frozen representation (the
paper's quick metric). OUT/results.md (Markdown) and OUT/results.csv get one row per config, with
what it changes relative to configs/ablations/base.yaml. KEY=VALUE overrides apply to every run.

Small-data caveat: on 1,437 training digits the paper's large-data findings (depth helps most,
position embeddings matter little) need not reproduce; the table says what happened here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
COLUMNS = ("config", "changes", "params", "steps", "train_loss", "top1", "fewshot_5shot", "seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="config names (default: every file but base)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per config")
    parser.add_argument("--out", default="runs/ablation_study", help="output directory")
    parser.add_argument("--data", help="where to write the digits shards (default: OUT/digits)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    return parser.parse_args(argv)


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


def train(path: Path, overrides: list[str], out: Path) -> tuple[Path, float]:
    """One `vitscale train` run from scratch; returns (its run directory, wall seconds)."""
    import shutil

    from vitscale.config import load_config

    run_dir = load_config(path, overrides).run.directory
    shutil.rmtree(run_dir, ignore_errors=True)  # a study run always starts fresh
    command = [sys.executable, "-m", "vitscale", "train", "--config", str(path), *overrides]
    started = time.perf_counter()
    log = out / "logs" / f"{path.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"ablation_study: {path.name} failed (exit {done.returncode}); see {log}:\n" + "\n".join(tail))
    return run_dir, time.perf_counter() - started


def score(run_dir: Path, steps: int) -> dict[str, float]:
    """Final training loss (mean of the last tenth of logged steps), held-out top-1, 5-shot accuracy."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if r.get("loss") is not None and "step" in r]
    tail = losses[-max(1, len(losses) // 10):]
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


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(column, row[column]) for column in COLUMNS) + " |")
    (out / "results.md").write_text("Ablations on the digits demo data (held-out top-1 and 5-shot accuracy; "
                                    "chance is 0.100).\n\n" + "\n".join(lines) + "\n")
    return out / "results.md", out / "results.csv"


def _cell(column: str, value) -> str:
    if column == "seconds":
        return f"{value:.0f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = ablation_configs(args.only)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    train_shards, eval_shards = digits_shards(Path(args.data).resolve() if args.data else out / "digits")
    overrides = [f"data.train_shards={train_shards}", f"data.eval_shards={eval_shards}", f"run.steps={args.steps}",
                 f"run.output_dir={out / 'runs'}", "metrics.port=0", *args.overrides]
    rows = []
    for path in configs:
        print(f"ablation_study: {path.stem} ...", flush=True)
        run_dir, seconds = train(path, overrides, out)
        row = {"config": path.stem, "changes": changes_from_base(path, overrides),
               "params": parameter_count(path, overrides), "seconds": seconds, **score(run_dir, args.steps)}
        rows.append(row)
        print(f"ablation_study: {path.stem}: top-1 {row['top1']:.3f}, 5-shot {row['fewshot_5shot']:.3f}, "
              f"loss {row['train_loss']:.3f} ({seconds:.0f} s)", flush=True)
        write_tables(rows, out)  # a partial table survives an interrupted study
    markdown, _ = write_tables(rows, out)
    print(markdown.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
