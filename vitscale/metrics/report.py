"""`vitscale report RUN_DIR`: loss, learning rate, throughput and MFU curves as PNG files.

    vitscale report runs/vit_h14_jft                 # writes runs/vit_h14_jft/report/*.png
    vitscale report runs/vit_h14_jft --output plots/

Reads the run's own log, RUN_DIR/log.jsonl (rank 0 appends one JSON line per logged step, and one
per evaluation). A requeued run appends again from its checkpoint: for a step logged twice the
later line wins, so the curves show the run that actually continued.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vitscale.errors import VitscaleError

TRAIN_KEYS = ("loss", "lr", "grad_norm", "images_per_second", "tokens_per_second", "mfu", "elapsed_seconds")


class RunLogError(VitscaleError):
    """A run log that is missing or holds no training steps."""


@dataclass
class RunLog:
    steps: list[int] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)  # key -> value per step (nan: absent)
    eval_steps: list[int] = field(default_factory=list)
    evals: dict[str, list[float]] = field(default_factory=dict)
    bad_lines: int = 0

    def has(self, key: str) -> bool:
        return any(not math.isnan(v) for v in self.series.get(key, []))


def load_run_log(path: str | Path) -> RunLog:
    path = Path(path)
    if not path.is_file():
        raise RunLogError(f"{path} not found (pass the run directory, run.output_dir/run.name, of a started run)")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            step = int(entry["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1  # e.g. the half-written last line of a killed run
            continue
        if isinstance(entry.get("eval"), dict):
            evals.setdefault(step, {}).update(entry["eval"])  # top-1 and few-shot of one step
        elif "loss" in entry:
            train[step] = entry  # later lines (a resumed run) replace earlier ones
        # checkpoint, resume and skip records share the step number of a training record; they
        # never replace it
    if not train:
        raise RunLogError(f"{path} holds no training steps yet (rank 0 writes one every run.log_every steps)")
    log = RunLog(steps=sorted(train), bad_lines=bad)
    log.series = {key: [_number(train[s].get(key)) for s in log.steps] for key in TRAIN_KEYS}
    log.eval_steps = sorted(evals)
    names = sorted({name for values in evals.values() for name in values})
    log.evals = {name: [_number(evals[s].get(name)) for s in log.eval_steps] for name in names}
    return log


def _number(value) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def moving_average(steps: list[int], values: list[float], window: int) -> list[float]:
    """Trailing mean of the finite values logged within the last `window` steps (not the last
    `window` logged points: with run.log_every=50, 20 points would span 1,000 steps)."""
    out, recent = [], []
    for step, value in zip(steps, values):
        if not math.isnan(value):
            recent.append((step, value))
        recent = [(s, v) for s, v in recent if s > step - window]
        out.append(sum(v for _, v in recent) / len(recent) if recent else math.nan)
    return out


# ---------------------------------------------------------------------------------------------
# Figures: one function per PNG, each returns the figure so tests can read its data back.


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_loss(log: RunLog, window: int):
    fig, ax = _figure("Training loss", "loss")
    ax.plot(log.steps, log.series["loss"], color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(log.steps, moving_average(log.steps, log.series["loss"], window), color="tab:blue", linewidth=2,
            label=f"mean over the last {window} steps")
    for name, values in log.evals.items():
        if name.endswith("loss"):
            ax.plot(log.eval_steps, values, "o-", color="tab:red", label=f"eval {name}")
    ax.legend()
    return fig


def plot_lr(log: RunLog):
    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(log.steps, log.series["lr"], color="tab:green", linewidth=2)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def plot_throughput(log: RunLog):
    fig, ax = _figure("Throughput", "images / s")
    ax.plot(log.steps, log.series["images_per_second"], color="tab:orange", linewidth=1.5, label="images/s")
    if log.has("tokens_per_second"):
        tokens_axis = ax.twinx()
        tokens_axis.set_ylabel("tokens / s")
        tokens_axis.plot(log.steps, log.series["tokens_per_second"], color="tab:purple", linewidth=1,
                         linestyle="--", label="tokens/s")
        ax.legend(ax.get_lines() + tokens_axis.get_lines(), ["images/s", "tokens/s"], loc="lower right")
    return fig


def plot_mfu(log: RunLog):
    fig, ax = _figure("Model FLOPs utilisation", "MFU (%)")
    ax.plot(log.steps, [100 * v for v in log.series["mfu"]], color="tab:red", linewidth=1.5)
    ax.set_ylim(bottom=0)
    return fig


# Evaluation values that are fractions (accuracies); losses go on the loss figure, and counts
# (samples) on none: they would flatten every accuracy curve.
def accuracy_names(log: RunLog) -> list[str]:
    return [name for name in log.evals if name not in ("samples", "images") and not name.endswith("loss")]


def plot_eval(log: RunLog):
    fig, ax = _figure("Evaluation", "accuracy")
    for name in accuracy_names(log):
        values = log.evals[name]
        ax.plot([s for s, v in zip(log.eval_steps, values) if not math.isnan(v)],
                [v for v in values if not math.isnan(v)], "o-", label=name)
    ax.set_ylim(0, 1)
    ax.legend()
    return fig


def write_report(log: RunLog, output: Path, window: int = 20) -> list[Path]:
    """Render every available curve of `log` to PNG files in `output`; returns the files written."""
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    figures = {"loss": plot_loss(log, window), "lr": plot_lr(log), "throughput": plot_throughput(log)}
    if log.has("mfu"):  # CPU runs log null: no peak FLOP/s to divide by
        figures["mfu"] = plot_mfu(log)
    if accuracy_names(log):
        figures["eval"] = plot_eval(log)
    written = []
    for name, fig in figures.items():
        path = output / f"{name}.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def summary(log: RunLog, window: int = 20) -> str:
    losses = [(s, v) for s, v in zip(log.steps, log.series["loss"]) if not math.isnan(v)]
    parts = [f"steps {log.steps[0]}..{log.steps[-1]} ({len(log.steps)} logged)"]
    if losses:
        recent = [v for s, v in losses if s > losses[-1][0] - window]
        parts.append(f"final loss {losses[-1][1]:.4g} at step {losses[-1][0]} "
                     f"(mean {sum(recent) / len(recent):.4g} over its last {window} steps)")
    throughput = [v for v in log.series["images_per_second"] if not math.isnan(v)]
    if throughput:
        parts.append(f"median {sorted(throughput)[len(throughput) // 2]:.1f} images/s")
    mfu = [v for v in log.series["mfu"] if not math.isnan(v)]
    if mfu:
        parts.append(f"median MFU {100 * sorted(mfu)[len(mfu) // 2]:.1f}%")
    return ", ".join(parts)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (holds log.jsonl)")
    parser.add_argument("--output", help="where to write the PNGs (default RUN_DIR/report)")
    parser.add_argument("--window", type=int, default=20, help="steps in the loss moving average")


def run(args) -> int:
    if args.window < 1:
        raise RunLogError(f"--window must be >= 1, got {args.window}")
    run_dir = Path(args.run_dir)
    log = load_run_log(run_dir / "log.jsonl")
    written = write_report(log, Path(args.output) if args.output else run_dir / "report", args.window)
    print(summary(log, args.window))
    if log.bad_lines:
        print(f"skipped {log.bad_lines} unreadable line(s) of log.jsonl")
    for path in written:
        print(path)
    return 0
