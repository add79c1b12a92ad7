"""Masked patch prediction and GSAM through the real engine (`vitscale train`, DeepSpeed ZeRO-2
on CPU): the objective's [mask] embedding and predictor are optimised and checkpointed, the loss
falls, and GSAM's two-pass step runs under ZeRO-2 without skipped steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitscale.data.datasets import write_digits_shards
from vitscale.engine.checkpoint import latest_complete, safe_torch_load

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_masked_patch_with_gsam_trains_under_zero2(tmp_path):
    train_shards, _ = write_digits_shards(tmp_path / "digits", image_size=32)
    command = [sys.executable, "-m", "vitscale", "train", "--config", "configs/ablations/base.yaml",
               f"data.train_shards={train_shards}", "data.eval_shards=", "data.num_workers=1", "metrics.port=0",
               f"run.output_dir={tmp_path}", "run.name=mpp", "run.steps=24", "run.log_every=1",
               "run.objective=masked_patch", "masked_patch.target=mean_color", "model.image_size=16",
               "model.depth=2", "model.width=32", "model.mlp_dim=64", "engine.zero_stage=2",
               "engine.micro_batch_size=32", "engine.global_batch_size=32", "optim.name=gsam", "optim.lr=2e-3",
               "optim.rho=0.05", "optim.rho_min=0.01", "optim.alpha=0.3", "schedule.warmup_steps=3"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "mpp" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 24 and all(loss is not None for loss in losses), "no step may be skipped"
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"masked patch (mean colour) with GSAM under ZeRO-2: loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.5
    state = safe_torch_load(latest_complete(tmp_path / "mpp") / "mp_rank_00_model_states.pt")["module"]
    assert state["masked_patch.predictor.weight"].shape == (512, 32)
    assert state["masked_patch.mask_embedding"].shape == (32,)
    assert torch.isfinite(state["masked_patch.mask_embedding"]).all()
