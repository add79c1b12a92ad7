"""`vitscale report RUN_DIR`: curves drawn from the run log, checked against the values logged."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vitscale.cli import main  # noqa: E402
from vitscale.metrics.report import load_run_log, moving_average, plot_loss, plot_mfu, plot_throughput  # noqa: E402


def write_log(run_dir, steps, mfu=True, requeue_from=None):
    """A log as rank 0 writes it; with requeue_from, a resumed run re-logs steps after it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def train_line(step, offset=0.0):
        return {"step": step, "loss": 5.0 / step + offset, "lr": 1e-3 * min(1.0, step / 10),
                "grad_norm": 1.0, "images_per_second": 100.0 + step, "tokens_per_second": 257 * (100.0 + step),
                "mfu": 0.4 + step / 1000 if mfu else None, "elapsed_seconds": step * 0.5}

    for step in range(1, steps + 1):
        lines.append(train_line(step, offset=1.0 if requeue_from and step > requeue_from else 0.0))
        if step % 10 == 0:
            lines.append({"step": step, "eval": {"top1": step / 100, "loss": 2.0}})
    if requeue_from:
        for step in range(requeue_from + 1, steps + 1):
            lines.append(train_line(step))
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 99, "lo'  # killed mid-write
    (run_dir / "log.jsonl").write_text(text)


def test_report_writes_pngs_with_the_logged_curves(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_log(run_dir, 30)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "steps 1..30" in out and "skipped 1 unreadable line" in out
    for name in ("loss", "lr", "throughput", "mfu", "eval"):
        image = Image.open(run_dir / "report" / f"{name}.png")
        assert image.format == "PNG" and image.width > 400 and image.height > 200
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5  # something drawn, not a blank canvas

    log = load_run_log(run_dir / "log.jsonl")
    loss_line, smooth_line = plot_loss(log, window=5).axes[0].lines[:2]
    np.testing.assert_allclose(loss_line.get_xdata(), np.arange(1, 31))
    np.testing.assert_allclose(loss_line.get_ydata(), 5.0 / np.arange(1, 31))
    expected_smooth = [np.mean(5.0 / np.arange(max(1, s - 4), s + 1)) for s in range(1, 31)]
    np.testing.assert_allclose(smooth_line.get_ydata(), expected_smooth)
    images_line = plot_throughput(log).axes[0].lines[0]
    np.testing.assert_allclose(images_line.get_ydata(), 100.0 + np.arange(1, 31))
    np.testing.assert_allclose(plot_mfu(log).axes[0].lines[0].get_ydata(), 100 * (0.4 + np.arange(1, 31) / 1000))
    assert log.eval_steps == [10, 20, 30] and log.evals["top1"] == [0.1, 0.2, 0.3]


def test_resumed_run_replaces_the_steps_it_logged_again(tmp_path):
    write_log(tmp_path / "run", 20, requeue_from=12)
    log = load_run_log(tmp_path / "run" / "log.jsonl")
    assert log.steps == list(range(1, 21))  # each step once
    np.testing.assert_allclose(log.series["loss"], 5.0 / np.arange(1, 21))  # the resumed run's values


def test_cpu_run_without_mfu_gets_no_mfu_plot(tmp_path, capsys):
    write_log(tmp_path / "run", 5, mfu=False)
    assert main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png", "lr.png", "throughput.png"]


@pytest.mark.parametrize("content", [None, "", '{"step": 3, "eval": {"top1": 0.5}}\n'])
def test_missing_or_empty_log_is_one_clear_line(tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "log.jsonl").write_text(content)
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vitscale report: error:") and "log.jsonl" in err


def test_moving_average_skips_missing_values_and_spans_steps_not_points():
    assert moving_average([1, 2, 3, 4], [1.0, math.nan, 3.0, 5.0], 2) == [1.0, 1.0, 3.0, 4.0]
    # Logged every 10 steps, a 20-step window holds two points, not twenty.
    assert moving_average([10, 20, 30, 40], [4.0, 2.0, 6.0, 8.0], 20) == [4.0, 3.0, 4.0, 7.0]


def test_checkpoint_resume_and_skip_records_leave_no_hole_in_the_curves(tmp_path, capsys):
    """The records the loop writes beside a step's training record (checkpoint at every 5th step,
    a resume at 10, a skipped step's record, few-shot and top-1 evaluations of one step) must not
    replace it; the eval figure shows accuracies only, on their own axis."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "loss": 3.0 - step / 10, "lr": 1e-3, "grad_norm": 1.0,
                      "images_per_second": 50.0, "tokens_per_second": 50.0 * 65, "mfu": None, "elapsed_seconds": step})
        if step % 5 == 0:
            lines.append({"step": step, "checkpoint": f"ckpt/step_{step:08d}", "checkpoint_ok": True,
                          "checkpoint_seconds": 0.1})
        if step == 10:
            lines.append({"step": 10, "resumed_from": "ckpt/step_00000010"})
            lines.append({"step": 10, "eval": {"top1": 0.5, "loss": 1.5, "samples": 360}})
            lines.append({"step": 10, "eval": {"fewshot_5shot": 0.7}})
    lines.append({"step": 20, "nonfinite_skip": True, "nonfinite_total": 1})
    (run_dir / "log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    log = load_run_log(run_dir / "log.jsonl")
    assert log.steps == list(range(1, 21))
    loss = plot_loss(log, window=20).axes[0].lines[0].get_ydata()
    np.testing.assert_allclose(loss, 3.0 - np.arange(1, 21) / 10)  # no NaN at 5, 10, 15, 20
    from vitscale.metrics.report import plot_eval

    eval_axis = plot_eval(log).axes[0]
    assert sorted(line.get_label() for line in eval_axis.lines) == ["fewshot_5shot", "top1"]
    assert eval_axis.get_ylim() == (0.0, 1.0)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "final loss 1 at step 20" in out and "nan" not in out
