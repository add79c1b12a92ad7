"""Ablation configs: each paper switch has a config that changes exactly that switch (and the
classifier its own learning rate); they all build; the study script trains and tabulates."""

from __future__ import annotations

import csv
import importlib.util
import math
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
def test_study_trains_and_writes_the_table(tmp_path):
    study_module().main(["--only", "posemb_learned_2d", "--steps", "6", "--out", str(tmp_path),
                         "engine.micro_batch_size=16", "engine.global_batch_size=16"])
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 1 and rows[0]["config"] == "posemb_learned_2d"
    assert rows[0]["changes"] == "model.pos_embed=learned_2d"
    assert int(rows[0]["steps"]) == 6
    for key in ("top1", "fewshot_5shot"):
        assert 0.0 <= float(rows[0][key]) <= 1.0
    assert math.isfinite(float(rows[0]["train_loss"]))
    with torch.device("meta"):
        expected = count_parameters(build_model(load(ABLATIONS / "posemb_learned_2d.yaml").model), include_head=False)
    assert int(rows[0]["params"]) == expected
    table = (tmp_path / "results.md").read_text()
    assert "| posemb_learned_2d | model.pos_embed=learned_2d |" in table
    assert (tmp_path / "runs" / "ablation_posemb_learned_2d" / "log.jsonl").is_file()
