"""`vitscale bench`: each sub-benchmark runs on CPU and writes well-formed JSON. Never timings."""

import json
import math

import pytest

from vitscale.bench import cli as bench_cli
from vitscale.cli import main


def finite_or_none(value):
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0)


def test_attention_bench_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITSCALE_ATTENTION_CHOICES", str(tmp_path / "choices.json"))
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--quick", "--repeats", "1", "--json", str(out), "--save-choices"]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "attention" and result["dtype"] == "float32"
    shapes = {(r["shape"], r["tokens"], r["head_dim"]) for r in result["rows"]}
    assert shapes == {("B/16@224", 197, 64), ("L/16@224", 197, 64), ("H/14@224", 257, 80)}
    assert {r["backend"] for r in result["rows"]} == {"math", "sdpa"}
    assert "triton" in result["skipped"] and "flash" in result["skipped"]
    for row in result["rows"]:
        assert all(finite_or_none(row[key]) and row[key] > 0 for key in ("fwd_ms", "fwd_bwd_ms", "fwd_tflops"))
        # The TFLOP/s follow from the stated FLOP convention.
        flops = 4 * row["batch"] * row["heads"] * row["tokens"] ** 2 * row["head_dim"]
        assert row["fwd_bwd_tflops"] == pytest.approx(3.5 * flops / (row["fwd_bwd_ms"] / 1e3) / 1e12)
    choices = json.loads((tmp_path / "choices.json").read_text())["entries"]
    assert {(c["tokens"], c["head_dim"]) for c in choices} == {(197, 64), (257, 80)}
    assert "| backend |" in capsys.readouterr().out.replace("  ", " ")


def test_train_bench_compares_with_timm(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--model", "Ti/16", "--image-size", "32", "--num-classes", "10", "--batch-size", "2",
            "--steps", "2", "--warmup", "1", "--modes", "eager", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    # Ti/16 with 5 tokens and 10 classes
    assert result["parameters"] == 5_717_416 - 1000 * 192 - 1000 + 10 * 192 + 10 - 192 * 192
    rows = {(r["library"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {("vitscale", "eager"), ("timm", "eager")}
    assert rows[("timm", "eager")]["speedup_vs_timm"] == 1.0
    for row in rows.values():
        assert row["mfu"] is None  # no peak on CPU
        assert row["tokens_per_second"] == pytest.approx(row["images_per_second"] * 5)
        # The roofline here: the step's achieved FLOP/s against a GEMM measured in the same run.
        achieved = result["training_flops_per_image"] * row["images_per_second"] / 1e12
        assert row["achieved_tflops"] == pytest.approx(achieved)
        assert 0 < row["of_measured_gemm"] == pytest.approx(row["achieved_tflops"] / result["measured_gemm"]["tflops"])
        assert all(finite_or_none(row[k]) and row[k] > 0 for k in ("step_ms", "forward_backward_ms", "optimizer_ms"))
    assert "vs timm" in capsys.readouterr().out


def test_checkpoint_bench_writes_the_whole_adamw_state_and_compares_with_raw_io(tmp_path, capsys):
    out = tmp_path / "ckpt.json"
    assert main(["bench", "checkpoint", "--model", "Ti/16", "--engine", "local", "--dir", str(tmp_path / "d"),
                 "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    parameters = 5_717_416 - 192 * 192  # Ti/16 at 32 px (5 position embeddings), 1000 classes
    # fp32 weights + two Adam moments, plus DCP's metadata and per-tensor records (under 2%)
    assert 12 * parameters < result["bytes"] < 12 * parameters * 1.02
    assert [row["operation"].split()[0] for row in result["rows"]] == ["save", "verify", "load"]
    assert all(row["gb_per_s"] > 0 and row["ratio"] == pytest.approx(row["gb_per_s"] / row["raw_gb_per_s"])
               for row in result["rows"])
    assert not (tmp_path / "d").exists() and "raw sequential" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "train", "--modes", "eager,jit"]) == 2
    assert "--modes" in capsys.readouterr().err
    assert main(["bench", "attention", "--backends", "cudnn"]) == 2


def test_all_quick_runs_every_benchmark(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_cli.QUICK_SETTINGS, "train", dict(model="Ti/16", image_size=32, num_classes=10,
                                                               batch_size=2, steps=1, warmup=0, modes="eager"))
    monkeypatch.setitem(bench_cli.QUICK_SETTINGS, "data", {**bench_cli.QUICK_SETTINGS["data"], "images": 4,
                                                          "image_size": 32})
    assert main(["bench", "all", "--quick", "--json-dir", str(tmp_path)]) == 0
    for name in ("attention", "train"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    if bench_cli._module("data") is not None:
        assert json.loads((tmp_path / "data.json").read_text())
    replay = json.loads((tmp_path / "replay.json").read_text())
    assert replay["samples"] == 1_000_000 and 0 < replay["samples_left"] < 1_000_000
