"""A tiny real training job for the service tests: JFT-style multi-label shards + config overrides."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = "configs/vit_h14_jft_tiny.yaml"


def write_tiny_jft_shards(out_dir: Path, samples: int = 256, per_shard: int = 64) -> str:
    """scikit-learn digits at 28 px with `.json` label lists (the JFT layout) -> brace pattern."""
    from vitscale.data.datasets import digits_arrays
    from vitscale.data.writer import encode_image, write_shards

    images, labels = digits_arrays(28)

    def records():
        for i in range(samples):
            yield {"__key__": f"digit_{i:05d}", "png": encode_image(images[i], "png"),
                   "json": json.dumps([int(labels[i])]).encode()}

    pattern, _ = write_shards(records(), out_dir, prefix="train", max_count=per_shard)
    return pattern


def tiny_overrides(shards: str, output_dir: Path, steps: int, **extra: str) -> list[str]:
    """Dotted overrides that make the ViT-H/14 config a seconds-long 2-process CPU job."""
    items = {"data.train_shards": shards, "data.eval_shards": "", "data.num_workers": "1",
             "run.output_dir": str(output_dir), "run.steps": str(steps), "engine.checkpoint_every": "0"}
    items.update(extra)
    return [f"{key}={value}" for key, value in items.items()]


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass  # the line being written right now
    return [line for line in lines if "loss" in line]
