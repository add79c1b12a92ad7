"""Ablation configs: each paper switch has a config that changes exactly that switch (and the
classifier its own learning rate); they all build; the study script trains and tabulates."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitscale.config import load_config
from vitscale.model import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
CONFIGS = sorted(p for p in ABLATIONS.glob("*.yaml") if p.stem != "base")
# Which keys each family of configs may change relative to base.yaml.
ALLOWED = {"classifier": {"model.classifier", "optim.lr"}, "posemb": {"model.pos_embed", "model.attention_backend"},
           "norm": {"model.norm_position"}, "depth": {"model.depth"}, "width": {"model.width", "model.heads"},
           "mlp": {"model.mlp_dim"}, "patch": {"model.patch_size"}}


def flat(config) -> dict:
    out = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out


def load(path: Path):
    return load_config(path)


def test_each_config_changes_one_switch():
    base = flat(load(ABLATIONS / "base.yaml"))
    for path in CONFIGS:
        mine = flat(load(path))
        changed = {key for key in mine if mine[key] != base[key]} - {"run.name"}
        family = path.stem.split("_")[0]
        assert changed <= ALLOWED[family], (path.name, changed)
        assert path.read_text().startswith("#") and "vitscale train --config configs/ablations/" in path.read_text()


def test_every_paper_switch_is_covered():
    configs = [load(path) for path in CONFIGS]
    assert {c.model.classifier for c in configs} >= {"token", "gap"}
    assert {c.model.pos_embed for c in configs} >= {"none", "learned_1d", "learned_2d", "relative"}
    assert {c.model.norm_position for c in configs} == {"pre", "post"}
    base = load(ABLATIONS / "base.yaml").model.shape()
    shapes = [c.model.shape() for c in configs]
    for field in ("depth", "width", "mlp_dim", "patch_size"):
        values = {getattr(s, field) for s in shapes}
        assert min(values) < getattr(base, field) < max(values), field
    # Class token and GAP each at their own learning rate, plus GAP at the token's (paper, Figure 9).
    lrs = {(c.model.classifier, c.optim.lr) for c in configs}
    assert {("token", 8e-4), ("gap", 3e-4), ("gap", 8e-4)} <= lrs


def test_configs_build_with_the_expected_parameter_counts():
    with torch.device("meta"):
        params = {p.stem: count_parameters(build_model(load(p).model), include_head=False) for p in CONFIGS}
        base = count_parameters(build_model(load(ABLATIONS / "base.yaml").model), include_head=False)
    width, tokens = 64, 64 + 1
    assert base - params["posemb_none"] == tokens * width          # the 1-D table is gone
    assert base - params["posemb_learned_2d"] == tokens * width - (8 + 8) * width // 2 - width
    assert params["posemb_sincos_2d"] == params["posemb_none"]     # fixed table: no parameters
    per_block = (base - params["depth_2"]) // 2
    assert params["depth_8"] - base == 4 * per_block
    assert params["width_32"] < base < params["width_128"]
    assert params["classifier_gap"] == base - 2 * width             # no [class] token, nor its position
    assert params["norm_post"] == base - 2 * width                  # post-LN: no final LayerNorm


def study_module():
    spec = importlib.util.spec_from_file_location("ablation_study", ROOT / "scripts" / "ablation_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_config_name_is_one_line():
    with pytest.raises(SystemExit, match="unknown config 'posemb_3d'"):
        study_module().main(["--only", "posemb_3d"])


@pytest.mark.slow
def test_study_trains_every_seed_and_writes_mean_and_std(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out is relative to the working directory
    table = tmp_path / "docs" / "results.md"
    study_module().main(["--only", "posemb_learned_2d", "--steps", "6", "--seeds", "2", "--jobs", "2",
                         "--out", "study", "--table", str(table),
                         "engine.micro_batch_size=16", "engine.global_batch_size=16"])
    out = tmp_path / "study"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["config"], r["seed"]) for r in rows] == [("posemb_learned_2d", "0"), ("posemb_learned_2d", "1")]
    assert rows[0]["changes"] == "model.pos_embed=learned_2d"
    assert all(int(r["steps"]) == 6 for r in rows)
    for key in ("top1", "fewshot_5shot"):
        assert all(0.0 <= float(r[key]) <= 1.0 for r in rows)
    losses = [float(r["train_loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[0] != losses[1]  # the seeds are different runs
    # The train loss is the mean over the last tenth of the run (at least one logged step), per run.
    logged = [json.loads(line) for line in (out / "runs" / "posemb_learned_2d_seed1" / "log.jsonl").open()]
    losses_by_step = {r["step"]: r["loss"] for r in logged if r.get("loss") is not None and "step" in r}
    assert sorted(losses_by_step) == list(range(1, 7))
    assert float(rows[1]["train_loss"]) == pytest.approx(losses_by_step[6], rel=1e-6)
    with torch.device("meta"):
        expected = count_parameters(build_model(load(ABLATIONS / "posemb_learned_2d.yaml").model), include_head=False)
    assert int(rows[0]["params"]) == expected
    mean, std = statistics.fmean(losses), statistics.stdev(losses)
    row = next(line for line in table.read_text().splitlines() if line.startswith("| posemb_learned_2d |"))
    assert row.startswith(f"| posemb_learned_2d | model.pos_embed=learned_2d | {expected} | 2 |")
    assert f"{mean:.3f} ± {std:.3f}" in row
    assert table.read_text() == (out / "results.md").read_text()
    assert "Generated by `python scripts/ablation_study.py --only posemb_learned_2d" in table.read_text()


@pytest.mark.slow
def test_sigterm_stops_the_study_and_its_training(tmp_path):
    script = ROOT / "scripts" / "ablation_study.py"
    study = subprocess.Popen([sys.executable, "-P", str(script), "--only", "depth_2", "--steps", "100000",
                              "--seeds", "1", "--out", str(tmp_path), "run.log_every=1"], cwd=tmp_path)
    log = tmp_path / "runs" / "depth_2_seed0" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.stat().st_size) and time.monotonic() < deadline:
        assert study.poll() is None, "the study ended before training started"
        time.sleep(0.5)
    assert log.is_file(), "training never logged a step"
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=60) == 128 + signal.SIGTERM
    trainings = subprocess.run(["pgrep", "-f", f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert trainings.stdout.strip() == "", "a training outlived the study"
