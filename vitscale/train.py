"""The main job: WebDataset shards -> ViT -> an engine (DeepSpeed ZeRO, FSDP2 or local), with
checkpoints, evaluation and faults.

    deepspeed vitscale/train.py --ds_config configs/zero2.json --config configs/vit_b16_i21k.yaml
    torchrun --nproc_per_node 8 vitscale/train.py --ds_config configs/zero2.json --config ... KEY=VALUE
    torchrun --nproc_per_node 8 vitscale/train.py --config ... engine.kind=fsdp2
    vitscale train --config configs/vit_b16_i21k_tiny.yaml data.train_shards=DIR   (one process)

Everything a user can get wrong (config, DeepSpeed JSON, batch sizes, shards, the checkpoint to
resume) is checked in `prepare` before any process group starts. Top to bottom: pre-flight,
building blocks (model, data, evaluators), the loop (train_step, train), evaluation,
checkpoints, entry points. The loop talks to the engine only through vitscale/engine/base.py's
protocol and to other ranks only through `engine.comm`. Exit codes: see vitscale/engine/faults.py
(0 done, 2 bad input, 3 too many non-finite steps, 4 hang, 5 final checkpoint failed, 75 stopped
on a signal after saving).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script, vitscale/ itself is first on sys.path and vitscale/data, vitscale/config.py
    # ... would shadow top-level modules of the same name.
    sys.path.pop(0)

from vitscale import signals

signals.install_early()  # before torch/DeepSpeed load: a SIGTERM/SIGUSR1 from now on is kept

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any, Iterator

import torch
from torch import nn

from vitscale.config import Config, add_config_arguments, load_config, save_config
from vitscale.engine import Engine, Launch, build_engine, set_learning_rate, start_process_group
from vitscale.engine import checkpoint as ckpt
from vitscale.engine import faults, manifest, staging
from vitscale.engine.distributed import Communicator, is_collective_failure, stop_process_group
from vitscale.engine.ds_config import deepspeed_config, read_ds_json, resolve_zero_stage
from vitscale.engine.optim import learning_rate
from vitscale.errors import CheckpointError, ConfigError, DataError, VitscaleError
from vitscale.objectives import build_backward, build_objective


# ---------------------------------------------------------------------------------------------
# Command line and pre-flight checks (no process group yet).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config",
                        help="DeepSpeed JSON (configs/zero1.json, zero2.json, zero3.json, zero2_offload.json)")
    # Passed by the deepspeed launcher; LOCAL_RANK from the environment is what is used.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)


@dataclass
class Prepared:
    config: Config
    ds_config: dict[str, Any]
    launch: Launch
    # Checkpoints to resume from, in order of preference (auto: every complete one, newest
    # first; the first that verifies is taken); explicit: engine.resume named the one to use.
    resume_candidates: list[Path] = field(default_factory=list)
    resume_explicit: bool = False


def prepare(args: argparse.Namespace) -> Prepared:
    """Load and check everything; raises VitscaleError before any process group exists."""
    launch = Launch.from_environment(getattr(args, "local_rank", None))
    overrides = list(args.overrides or [])
    if args.ds_config:
        overrides.append(f"engine.ds_config={args.ds_config}")
    config = load_config(args.config, overrides)
    ds: dict[str, Any] = {}
    if config.engine.kind == "deepspeed":
        ds_json = read_ds_json(config.engine.ds_config) if config.engine.ds_config else None
        if ds_json is not None:
            stage_override = any(item.lstrip("-").startswith("engine.zero_stage=") for item in args.overrides or [])
            resolve_zero_stage(config, ds_json, stage_override)
            config.validate()
        ds = deepspeed_config(config, launch.world_size, ds_json)
    else:
        from vitscale.engine.ds_config import gradient_accumulation_steps

        gradient_accumulation_steps(config.engine.global_batch_size, config.engine.micro_batch_size, launch.world_size)
    check_shards(config)
    candidates = find_resume_candidates(config)
    if candidates:
        # A config that cannot resume the newest checkpoint fails here, once per node; whether
        # its files are whole (trainer.json too) is verified with every rank once the group is up.
        try:
            newest = read_trainer_state(candidates[0])
        except CheckpointError:
            newest = None
        if newest is not None:
            check_resumable(newest, config, candidates[0])
    return Prepared(config, ds, launch, candidates, config.engine.resume.strip() not in ("auto", "never"))


def check_shards(config: Config) -> None:
    """Every local shard the config names must exist (pipe: URLs are checked when read)."""
    from vitscale.data.shards import expand_shards

    for key in ("train_shards", "eval_shards"):
        spec = getattr(config.data, key)
        if key == "eval_shards" and not spec.strip():
            continue
        urls = expand_shards(spec, allow_shell=config.data.allow_shell, key=f"data.{key}")
        missing = [url for url in urls if not url.startswith("pipe:") and not Path(url).is_file()]
        if missing:
            raise ConfigError(f"data.{key}", f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})",
                              "fix the path or pattern; `vitscale shards write` makes shards")


def find_resume_candidates(config: Config) -> list[Path]:
    mode, run_dir = config.engine.resume.strip(), config.run.directory
    if mode == "never":
        if ckpt.latest_complete(run_dir) is not None:
            raise ConfigError("engine.resume", f"is never but {run_dir} already holds checkpoints",
                              "use another run.name, or engine.resume=auto to continue that run")
        return []
    return ckpt.complete_checkpoints_newest_first(run_dir) if mode == "auto" else [ckpt.resolve_checkpoint(mode)]


@dataclass
class Resume:
    path: Path
    saved: dict[str, Any]                   # its trainer.json
    rejected: list[str]                     # newer checkpoints that failed verification, and why


def choose_checkpoint(prepared: Prepared, comm: Communicator) -> Resume | None:
    """The first candidate whose files verify on every rank; engine.resume=auto passes over
    damaged ones (saying which file and why, and renaming them out of the checkpoint list so
    their steps are saved again), an explicit engine.resume=PATH does not."""
    rejected, set_aside = [], []
    for path in prepared.resume_candidates:
        problems = verify_checkpoint(path, comm, prepared.launch.rank)
        if not problems:
            saved = check_resumable(read_trainer_state(path), prepared.config, path)
            if set_aside and prepared.launch.rank == 0:
                for damaged in set_aside:  # kept for inspection; the run saves those steps afresh
                    damaged.rename(damaged.with_name(f"{damaged.name}.damaged-{int(time.time())}"))
            comm.barrier()
            return Resume(path, saved, rejected)
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        verdict = f"{path} fails verification: {problems[0]}{more}"
        if prepared.resume_explicit:
            raise CheckpointError(f"{verdict}; restore the file, or name another checkpoint in engine.resume")
        if prepared.launch.rank == 0:
            print(f"vitscale: checkpoint {verdict}; trying the previous one (it is kept as "
                  f"{path.name}.damaged-TIME)", file=sys.stderr, flush=True)
        rejected.append(verdict)
        set_aside.append(path)
    if rejected:
        raise CheckpointError(f"none of the {len(rejected)} complete checkpoints of {prepared.config.run.directory} "
                              f"verifies (newest: {rejected[0]}); restore the files (`vitscale checkpoint verify "
                              "PATH` names them), or start afresh under another run.name")
    return None


def verify_checkpoint(path: Path, comm: Communicator, rank: int) -> list[str]:
    """Every problem any rank found in `path`'s files (each rank digests a share of them)."""
    manifests = ckpt.read_complete(path).get("manifests")
    if isinstance(manifests, int) and manifests > 0:
        local = manifest.verify(path, manifests, share=(rank, comm.world_size))
    else:  # written before checkpoints had manifests: whole and present is all that can be checked
        try:
            saved_world = read_trainer_state(path)["world_size"]
        except CheckpointError as error:
            local = [str(error)]
        else:
            problem = ckpt.part_problem(path, rank, comm.world_size, saved_world)
            local = [f"rank {rank}: {problem}"] if problem else []
    return [problem for problems in comm.all_gather_object(local) for problem in problems]


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}/trainer.json is unreadable ({error}); pick another checkpoint") from None
    trainer.setdefault("engine", "deepspeed")  # written before engine.kind existed
    return trainer


# Checkpoint formats: DeepSpeed's own files, or DCP (shared by local and FSDP2).
CHECKPOINT_FORMAT = {"deepspeed": "deepspeed", "fsdp2": "dcp", "local": "dcp"}


def check_resumable(saved: dict[str, Any], config: Config, path: Path) -> dict[str, Any]:
    """Any world size resumes (resharded); refused only what cannot be converted exactly."""
    kind = config.engine.kind
    if CHECKPOINT_FORMAT[saved["engine"]] != CHECKPOINT_FORMAT[kind]:
        raise CheckpointError(f"{path} was written by engine.kind={saved['engine']}, this job has engine.kind={kind}; "
                              f"resume with engine.kind={saved['engine']}, or export it (`vitscale export`) and start "
                              "from the weights (finetune.init_from)")
    if kind == "deepspeed":
        old, new = saved.get("zero_stage"), config.engine.zero_stage
        if old is not None and old != new and 0 in (old, new):
            raise CheckpointError(f"{path} was written with ZeRO-{old}, this job uses ZeRO-{new}; a ZeRO-0 "
                                  "checkpoint has no partitions to re-split: resume with "
                                  f"engine.zero_stage={old}, or export and start from the weights")
    return saved


# ---------------------------------------------------------------------------------------------
# Building blocks.


def build_model(config: Config, objective: Any, log=None) -> nn.Module:
    """The ViT (fine-tuning: initialised from finetune.init_from), plus any parameters the
    objective adds; identical on every rank (same seed). `log` prints one-off notes (rank 0)."""
    torch.manual_seed(config.run.seed)
    finetune = getattr(config, "finetune", None)
    if finetune is not None and finetune.init_from:
        from vitscale.research.finetune import build_finetune_model

        model = build_finetune_model(config, log=log)
    else:
        from vitscale.model import build_model as build_vit

        model = build_vit(config.model)
    objective.attach(model)
    return model


def build_dataloader(config: Config, launch: Launch, comm: Communicator):
    from vitscale.data import build_train_loader

    return build_train_loader(config.data, micro_batch_size=config.engine.micro_batch_size,
                              image_size=config.model.image_size, num_classes=config.model.num_classes,
                              rank=launch.rank, world_size=launch.world_size, seed=config.run.seed,
                              run_dir=config.run.directory, share=comm.broadcast_object)


def check_ranks_agree_on_data(t: "Trainer") -> None:
    """Every rank must plan the same epoch (shards, counts, seed, order settings, topology,
    position): else they yield different batch counts or lose samples between their slices."""
    digest = getattr(t.loader, "plan_digest", None)
    if digest is None:  # a loader without a plan (synthetic data in tests)
        return
    every = t.engine.comm.all_gather_object(digest())
    differing = [rank for rank, value in enumerate(every) if value != every[0]]
    if differing:
        raise DataError(f"ranks {differing} plan another data epoch than rank 0 (shard list, counts, seed, order "
                        f"settings or position differ): give every rank the same config and shards")


def build_evaluators(config: Config, launch: Launch) -> list[Any]:
    """What runs besides training, each on its own schedule (`every` steps, `at_end`)."""
    from vitscale.evaluation.fewshot import FewShotEvaluator
    from vitscale.evaluation.top1 import TopOneEvaluation

    found = [TopOneEvaluation.from_config(config, rank=launch.rank, world_size=launch.world_size),
             FewShotEvaluator.from_config(config)]
    return [evaluator for evaluator in found if evaluator is not None]


# ---------------------------------------------------------------------------------------------
# The loop.


class ForwardTimer:
    """This rank's own compute per step for the straggler view: the training forwards, timed by
    hooks on the model (no collective runs in them under ZeRO-0/1/2 and the local engine, so a
    slow rank shows here instead of slowing every rank's step alike). On a GPU the hooks record
    CUDA events, read only when the loop asks (logging steps)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []
        self.started: Any = None
        module.register_forward_pre_hook(self._begin)
        module.register_forward_hook(self._end)

    def _begin(self, module: nn.Module, args) -> None:
        if not module.training:
            return  # evaluation forwards are not training compute
        self.started = self._now()
        faults.maybe_inject("forward")  # test-only slowdown of one rank, inside the timed region

    def _end(self, module: nn.Module, args, output) -> None:
        if self.started is None:
            return
        if self.cuda:
            self.events.append((self.started, self._now()))
        else:
            self.seconds += time.perf_counter() - self.started
        self.started = None

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def take(self, steps: int) -> float:
        """Mean forward seconds per step over the `steps` steps since the last call."""
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000
            self.events = []
        mean = self.seconds / max(steps, 1)
        self.seconds = 0.0
        return mean


@dataclass
class TrainerState:
    step: int = 0                  # optimizer steps completed
    consecutive_nonfinite: int = 0
    nonfinite_total: int = 0
    elapsed_seconds: float = 0.0   # training time over all attempts (resumes add up)


@dataclass
class Trainer:
    config: Config
    launch: Launch
    engine: Engine
    objective: Any
    backward: Any                  # vitscale.objectives.Backward: plain, SAM or GSAM
    loader: Any
    metrics: Any
    stops: faults.StopRequests
    watchdog: faults.Watchdog
    evaluators: list[Any] = field(default_factory=list)
    state: TrainerState = field(default_factory=TrainerState)
    batches: Iterator | None = None
    log_file: Any = None
    last_step_seconds: float = 0.0
    grace_warned: bool = False
    backends_logged: bool = False
    checkpoint_bytes: int = 0      # this rank's bytes in its last checkpoint save
    checkpoint_async: bool = False  # periodic saves written in the background (engine.checkpoint_async)
    pending_save: PendingSave | None = None
    save_writer: staging.BackgroundWriter = field(default_factory=staging.BackgroundWriter)
    forward_timer: ForwardTimer | None = None
    window_data_wait: float = 0.0  # data-wait seconds since the last logging step

    @property
    def run_dir(self) -> Path:
        return self.config.run.directory

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    @property
    def accumulation(self) -> int:
        engine = self.config.engine
        return engine.global_batch_size // (engine.micro_batch_size * self.launch.world_size)

    @cached_property
    def tokens_per_image(self) -> int:
        from vitscale.model.flops import tokens_per_image

        return tokens_per_image(self.config.model)

    @cached_property
    def mfu_per_image_per_second(self) -> float | None:
        """Training FLOPs per image / the device's peak FLOP/s (None: no known peak), so that
        MFU = this x images/s per rank; fixed for the run, so looked up once."""
        from vitscale.bench.peaks import peak_flops
        from vitscale.model.flops import training_flops_per_image

        peak = peak_flops(self.engine.device, self.config.engine.precision, self.config.engine.peak_flops)
        return training_flops_per_image(self.config.model) / peak if peak else None

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.log_file.write(json.dumps(_finite_or_null(record)) + "\n")
            self.log_file.flush()


def _finite_or_null(value: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    return value


@dataclass
class StepResult:
    losses: torch.Tensor   # this rank's micro-batch losses, on the device
    grad_norm: torch.Tensor | None
    skipped: bool          # every rank skipped the update (non-finite loss or gradient somewhere)
    nonfinite_loss: bool   # some rank's loss was NaN/inf
    stop: int              # faults.STOP_* agreed by every rank
    data_wait_seconds: float
    save_in_flight: bool   # some rank is still writing the background save

    @property
    def loss_scale_skip(self) -> bool:
        return self.skipped and not self.nonfinite_loss


def train_step(t: Trainer) -> StepResult:
    """One optimizer step over `accumulation` micro-batches. Everything stays on the device but
    one vector read at the end: whether every rank skipped, the agreed stop request, and whether
    any rank is still writing a background save."""
    engine = t.engine
    set_learning_rate(engine, learning_rate(t.state.step, t.config))
    started = time.perf_counter()
    micro_batches = [next(t.batches) for _ in range(t.accumulation)]
    data_wait = time.perf_counter() - started
    weights = sample_weights(engine, [valid for _, _, valid in micro_batches])
    losses = []
    for index, (images, targets, _) in enumerate(micro_batches):
        images = images.to(engine.device, dtype=engine.input_dtype, non_blocking=True)
        targets = targets.to(engine.device, non_blocking=True)
        loss = t.backward(engine, t.objective, images, targets, weights[index],
                          boundary=index == t.accumulation - 1)
        losses.append(loss.detach().float().reshape(()))
    step_losses = torch.stack(losses)
    nonfinite_loss = engine.comm.device_any(~torch.isfinite(step_losses).all())
    outcome = engine.step(skip=nonfinite_loss)
    writing = t.pending_save is not None and not t.pending_save.files.done()
    skipped, nonfinite, term, requeue, saving = engine.comm.host_reduce(
        [outcome.skipped, nonfinite_loss, t.stops.requested == faults.STOP_TERM,
         t.stops.requested == faults.STOP_REQUEUE, writing], "max")
    stop = faults.STOP_REQUEUE if requeue else faults.STOP_TERM if term else faults.STOP_NONE
    return StepResult(step_losses, outcome.grad_norm, skipped > 0, nonfinite > 0, stop, data_wait, saving > 0)


def sample_weights(engine, valid_masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-sample loss weights of a step's micro-batches: 0 for holes (padding, skipped samples),
    else world x accumulation / (real samples in the global batch). Engines average gradients
    over ranks and micro-batches, so the step's gradient is the mean over its real samples; with
    no holes every weight is 1 / micro_batch, the plain mean. One device all-reduce, no host read."""
    local = torch.stack([mask.to(engine.device, non_blocking=True) for mask in valid_masks]).float()
    real = engine.comm.device_sum(local.sum()).clamp(min=1.0)
    scale = engine.comm.world_size * len(valid_masks) / real
    return list((local * scale).unbind(0))


def train(t: Trainer) -> int:
    """Steps until run.steps, a stop request, or too many non-finite steps. Returns the exit code."""
    config, state = t.config, t.state
    total = config.run.steps
    t.batches = iter(t.loader)
    window_started, window_steps = time.perf_counter(), 0
    while state.step < total:
        faults.set_context(step=state.step + 1)
        faults.maybe_inject("step_start")
        started = time.perf_counter()
        result = train_step(t)
        step_seconds = time.perf_counter() - started
        state.step += 1
        state.elapsed_seconds += step_seconds
        t.last_step_seconds = step_seconds
        t.window_data_wait += result.data_wait_seconds
        t.watchdog.beat()
        window_steps += 1
        if result.skipped and result.loss_scale_skip and config.engine.precision == "fp16":
            t.say(f"step {state.step}: fp16 gradients overflowed; DeepSpeed lowered the loss scale and skipped it")
        elif result.skipped:
            code = record_nonfinite(t)
            if code is not None:
                if t.pending_save is not None:
                    finish_save(t)  # an earlier, finite state: worth completing
                return code
        else:
            state.consecutive_nonfinite = 0
        logging_step = state.step % config.run.log_every == 0 or state.step == total
        values = read_step_values(t, result) if logging_step else None
        record_step(t, result, values, step_seconds)
        if logging_step:
            rate = config.engine.global_batch_size * window_steps / max(time.perf_counter() - window_started, 1e-9)
            log_progress(t, values, rate)
            log_attention_backends(t)
            record_rank_times(t, window_steps)
            window_started, window_steps = time.perf_counter(), 0
        if t.pending_save is not None and not result.save_in_flight:
            finish_save(t)  # every rank's background write is done
        run_due_evaluations(t, at_end=False)
        if result.stop:
            return stop_on_request(t, result.stop)
        if config.engine.checkpoint_every and state.step % config.engine.checkpoint_every == 0 \
                and state.step < total:
            save_checkpoint(t, background=t.checkpoint_async)
    run_due_evaluations(t, at_end=True)
    return faults.EXIT_OK if save_checkpoint(t) else faults.EXIT_CHECKPOINT_FAILED


def log_attention_backends(t: Trainer) -> None:
    """Once: what `attention_backend=auto` chose per shape (the same for the whole run)."""
    from vitscale.model.attention import resolved_backends

    backends = resolved_backends()
    if backends and not t.backends_logged:
        t.backends_logged = True
        t.log({"step": t.state.step, "attention_backends": backends})
        t.say("attention_backend=auto chose " + ", ".join(f"{b} for {shape}" for shape, b in backends.items()))


def read_step_values(t: Trainer, result: StepResult) -> dict[str, float]:
    """The host reads of a logging step: the loss over the global batch and the gradient norm."""
    loss_sum, count = t.engine.comm.host_reduce([result.losses.nan_to_num(0.0).sum(), len(result.losses)], "sum")
    grad_norm = float(result.grad_norm) if result.grad_norm is not None and not result.skipped else float("nan")
    return {"loss": float("nan") if result.skipped else loss_sum / count, "grad_norm": grad_norm}


def record_nonfinite(t: Trainer) -> int | None:
    state, limit = t.state, t.config.engine.max_consecutive_nonfinite
    state.consecutive_nonfinite += 1
    state.nonfinite_total += 1
    t.metrics.record_nan_skip()
    t.say(f"step {state.step}: non-finite loss or gradient on some rank; every rank skipped the update "
          f"({state.consecutive_nonfinite} in a row, {state.nonfinite_total} in total)")
    t.log({"step": state.step, "nonfinite_skip": True, "nonfinite_total": state.nonfinite_total})
    if state.consecutive_nonfinite >= limit:
        t.say(f"stopping: {limit} consecutive non-finite steps (engine.max_consecutive_nonfinite); the latest "
              f"complete checkpoint is {ckpt.latest_complete(t.run_dir)}; lower optim.lr or check the data")
        return faults.EXIT_NONFINITE
    return None


def record_step(t: Trainer, result: StepResult, values: dict[str, float] | None, step_seconds: float) -> None:
    """Metrics of every step; loss and gradient norm (host reads) only on logging steps."""
    images = t.config.engine.global_batch_size // t.launch.world_size
    tokens = images * t.tokens_per_image
    t.metrics.record_step(t.state.step, values["loss"] if values else None, learning_rate(t.state.step - 1, t.config),
                          values["grad_norm"] if values else None, images, tokens, step_seconds,
                          result.data_wait_seconds, _mfu(t, images / max(step_seconds, 1e-9)))
    if values is not None:
        t.metrics.record_skipped_samples(t.loader.skipped_samples())


def record_rank_times(t: Trainer, window_steps: int) -> None:
    """Logging steps: every rank's own time per step (forward compute, data wait; means over the
    window) to rank 0, which flags stragglers in its log and in Prometheus."""
    compute, data_wait = t.forward_timer.take(window_steps), t.window_data_wait / max(window_steps, 1)
    t.window_data_wait = 0.0
    every = t.engine.comm.all_gather([compute, data_wait])
    if t.is_main:
        for straggler in t.metrics.record_rank_times([rank[0] for rank in every], [rank[1] for rank in every]):
            t.say(f"step {t.state.step}: {straggler.message()}")
            t.log({"step": t.state.step, "straggler": {"rank": straggler.rank, "ratio": straggler.ratio,
                                                       "compute_seconds": straggler.compute_seconds,
                                                       "data_wait_seconds": straggler.data_wait_seconds}})


def _mfu(t: Trainer, images_per_second_per_rank: float) -> float | None:
    scale = t.mfu_per_image_per_second
    return None if scale is None else scale * images_per_second_per_rank


def log_progress(t: Trainer, values: dict[str, float], images_per_second: float) -> None:
    state, total = t.state, t.config.run.steps
    seconds_left = (total - state.step) * t.config.engine.global_batch_size / max(images_per_second, 1e-9)
    mfu = _mfu(t, images_per_second / t.launch.world_size)
    lr = learning_rate(state.step - 1, t.config)
    t.log({"step": state.step, "loss": values["loss"], "lr": lr, "grad_norm": values["grad_norm"],
           "images_per_second": images_per_second, "tokens_per_second": images_per_second * t.tokens_per_image,
           "mfu": mfu, "elapsed_seconds": state.elapsed_seconds, "nonfinite_total": state.nonfinite_total})
    t.say(f"step {state.step}/{total} | loss {values['loss']:.4f} | lr {lr:.2e} | {images_per_second:,.0f} images/s"
          f"{f' | MFU {mfu:.1%}' if mfu is not None else ''} | ETA {timedelta(seconds=round(seconds_left))}")


def stop_on_request(t: Trainer, stop: int) -> int:
    what = "SIGUSR1 (pre-emption warning)" if stop == faults.STOP_REQUEUE else "SIGTERM"
    t.say(f"step {t.state.step}: {what} received by some rank; every rank saves this step and exits")
    saved = save_checkpoint(t)
    if stop == faults.STOP_REQUEUE and t.is_main and saved:
        faults.requeue_slurm_job()
    return faults.EXIT_STOPPED if saved else faults.EXIT_CHECKPOINT_FAILED


# ---------------------------------------------------------------------------------------------
# Evaluation: top-1 on held-out shards, the paper's few-shot regression.


def run_due_evaluations(t: Trainer, *, at_end: bool) -> None:
    step, total = t.state.step, t.config.run.steps
    for evaluator in t.evaluators:
        periodic = evaluator.every and step % evaluator.every == 0
        if at_end and evaluator.at_end or (not at_end and periodic and (step < total or not evaluator.at_end)):
            run_evaluation(t, evaluator)


def run_evaluation(t: Trainer, evaluator) -> dict[str, float]:
    values = evaluator.run(t.engine, t.watchdog.beat)
    t.watchdog.beat()
    t.metrics.record_eval(values)
    t.log({"step": t.state.step, "eval": values})
    t.say(f"step {t.state.step}: {evaluator.name} " + ", ".join(
        f"{k} {v:.0f}" if k == "samples" else f"{k} {v:.4f}" for k, v in values.items()))
    return values


# ---------------------------------------------------------------------------------------------
# Checkpoints.


@dataclass
class PendingSave:
    """A checkpoint whose files this rank has started writing."""

    step: int
    path: Path
    files: Future             # resolves to the first failure as text, None once every file is on disk
    started: float            # time.perf_counter() when the save began
    blocked_seconds: float    # the loop's wait until the write was under way (all of it when synchronous)
    background: bool          # written by a thread while training goes on
    written_at: float | None = None

    def __post_init__(self):
        self.files.add_done_callback(lambda _: setattr(self, "written_at", time.perf_counter()))


def save_checkpoint(t: Trainer, *, background: bool = False) -> bool:
    """Every rank writes its part; COMPLETE is written only after every rank's files are on disk.
    `background`: return once the state is staged (the files are written while training goes
    on; `finish_save` completes the save when every rank reports its write done). A save in
    flight is finished first. A failure (full disk, ...) is reported and leaves the previous
    complete checkpoint in place. Returns whether the save completed (True when started in the
    background)."""
    comm = t.engine.comm
    path = ckpt.checkpoint_dir(t.run_dir, t.state.step)
    if ckpt.is_complete(path):
        return True  # resumed at this very step: it is already saved
    if t.pending_save is not None:
        finish_save(t, before_saving=True)
    started = time.perf_counter()
    t.watchdog.beat()
    if t.is_main and path.exists():
        shutil.rmtree(path)  # left by an interrupted attempt at this step
    comm.barrier()
    files = start_checkpoint_files(t, path, background)
    t.pending_save = PendingSave(t.state.step, path, files, started, time.perf_counter() - started, background)
    return True if background else finish_save(t)


def finish_save(t: Trainer, *, before_saving: bool = False) -> bool:
    """Wait for this rank's files of the save in flight, agree with every rank, and (rank 0) mark
    it COMPLETE. Collective: every rank calls it at the same step."""
    comm, pending = t.engine.comm, t.pending_save
    t.pending_save = None
    finishing = time.perf_counter()
    if before_saving and comm.host_reduce([not pending.files.done()], "max")[0] > 0:
        t.say(f"step {t.state.step}: the checkpoint of step {pending.step} is still being written; waiting for it "
              "before saving again (one save in flight at a time)")
    failure = pending.files.result()
    ok = comm.host_reduce([failure is None], "min")[0] > 0
    if failure:
        print(f"vitscale: rank {t.launch.rank}: checkpoint {pending.path} failed: {failure}", file=sys.stderr,
              flush=True)
    if t.is_main:
        ok = finish_checkpoint(t, pending.path, pending.step, ok)
    ok = comm.host_reduce([ok], "min")[0] > 0  # every rank learns rank 0's verdict
    t.watchdog.beat()
    now = time.perf_counter()
    seconds, blocked = now - pending.started, pending.blocked_seconds + now - finishing
    background = max(0.0, min(pending.written_at or finishing, finishing) - pending.started - pending.blocked_seconds) \
        if pending.background else 0.0
    t.metrics.record_checkpoint(seconds, ok, t.checkpoint_bytes if ok else 0, blocked_seconds=blocked,
                                background_seconds=background)
    t.log({"step": pending.step, "checkpoint": str(pending.path) if ok else None, "checkpoint_ok": ok,
           "checkpoint_seconds": seconds, "checkpoint_blocked_seconds": blocked,
           "checkpoint_background_seconds": background})
    if ok:
        during = f" ({blocked:.2f} s blocked, {background:.2f} s written in the background, complete at step " \
            f"{t.state.step})" if pending.background else ""
        t.say(f"step {pending.step}: saved {pending.path} in {seconds:.1f} s{during}")
        warn_if_stop_cannot_fit(t, seconds)
    else:
        t.say(f"step {pending.step}: checkpoint FAILED (see the rank errors above); the latest complete "
              f"checkpoint is still {ckpt.latest_complete(t.run_dir)}")
    return ok


def warn_if_stop_cannot_fit(t: Trainer, save_seconds: float) -> None:
    """A SIGTERM leaves VITSCALE_GRACE_SECONDS (Slurm's KillWait, set by the sbatch script) to
    finish the step and save; say so once when a step plus a save take longer."""
    grace = os.environ.get("VITSCALE_GRACE_SECONDS", "")
    needed = t.last_step_seconds + save_seconds
    if t.grace_warned or not grace.replace(".", "", 1).isdigit() or needed <= float(grace):
        return
    t.grace_warned = True
    t.say(f"warning: a step ({t.last_step_seconds:.1f} s) plus a checkpoint ({save_seconds:.1f} s) take longer than "
          f"the {float(grace):g} s a SIGTERM leaves (Slurm KillWait): a stop on SIGTERM would be killed before it "
          "saves; use --signal=B:USR1@SECONDS (an earlier warning) or ask for a longer KillWait")


def finish_checkpoint(t: Trainer, path: Path, step: int, ok: bool) -> bool:
    """Rank 0, after every rank wrote its files: the COMPLETE marker and retention; on failure,
    remove the partial directory so it costs no disk."""
    if ok:
        try:
            ckpt.mark_complete(path, {"step": step, "world_size": t.launch.world_size,
                                      "manifests": t.launch.world_size})
            ckpt.apply_retention(t.run_dir, t.config.engine.keep_last)
            return True
        except OSError as error:
            print(f"vitscale: rank 0: checkpoint {path} failed: {error.strerror or error}", file=sys.stderr, flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return False


def start_checkpoint_files(t: Trainer, path: Path, background: bool) -> Future:
    """This rank's files: the engine's (staged to host memory and written by a thread when
    `background`), its data position and RNG states, on rank 0 trainer.json and the config, then
    the manifest of them all. Everything of this step is captured before returning. The future
    resolves to the first failure as text; nothing raises, so every rank reaches the same
    collectives."""
    rank = t.launch.rank
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return staging.resolved(f"{error.strerror or error}")
    rank_state = {"rng": ckpt.rng_state(), "loader": copy.deepcopy(t.loader.state_dict()), "step": t.state.step,
                  "rank": rank}
    trainer_state = {**t.state.__dict__, "world_size": t.launch.world_size, "engine": t.config.engine.kind,
                     "zero_stage": t.config.engine.zero_stage}
    engine_files = t.engine.save_async(path) if background else staging.resolved(t.engine.save(path))

    def write_rest() -> str | None:
        failure = engine_files.result()
        if failure:
            return failure
        files = list(t.engine.saved_files) + [ckpt.rank_state_path(path, rank)]
        ckpt.torch_save_atomic(rank_state, files[-1])
        if rank == 0:
            ckpt.write_json(path / "trainer.json", trainer_state)
            save_config(t.config, path / "config.yaml")
            files += [path / "trainer.json", path / "config.yaml"]
        t.checkpoint_bytes = manifest.write_manifest(path, rank, files)
        return None

    return t.save_writer.submit(write_rest) if background else staging.resolved(staging.run_guarded(write_rest))


def load_checkpoint(t: Trainer, path: Path, saved: dict[str, Any]) -> None:
    """Engine (weights, optimizer), data position, RNG states and counters, from a checkpoint
    every rank has verified (choose_checkpoint). From another world
    size the engine reshards its state exactly; the data position continues with the samples of
    the epoch not yet seen (each once), and the RNGs start afresh from the seed and step."""
    rank, world = t.launch.rank, t.launch.world_size
    t.engine.load(path, saved_world_size=saved["world_size"])
    if saved["world_size"] == world:
        rank_state = ckpt.safe_torch_load(ckpt.rank_state_path(path, rank))
        ckpt.set_rng_state(rank_state["rng"])
        loader_state = rank_state["loader"]
    else:
        # The data position is the same on every old rank (equal batches); their skip counts
        # are summed on the new rank 0 so the job-wide totals stay right.
        loader_state = dict(ckpt.safe_torch_load(ckpt.rank_state_path(path, 0))["loader"])
        skipped: dict[str, int] = {}
        for old_rank in range(saved["world_size"]) if rank == 0 else ():
            counts = ckpt.safe_torch_load(ckpt.rank_state_path(path, old_rank))["loader"].get("skipped", {})
            for reason, count in counts.items():
                skipped[reason] = skipped.get(reason, 0) + count
        loader_state["skipped"] = skipped
        seed = (t.config.run.seed * 1_000_003 + saved["step"]) * 4099 + rank
        torch.manual_seed(seed)
        random.seed(seed)
        import numpy as np

        np.random.seed(seed % 2**32)
    t.loader.load_state_dict(loader_state, t.config.data.resume)
    t.state = TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved})
    resharded = f" (written by {saved['world_size']} ranks, resharded for {world})" \
        if saved["world_size"] != world else ""
    t.say(f"resumed from {path} at step {t.state.step}{resharded}")


# ---------------------------------------------------------------------------------------------
# Entry points.


def main_job(prepared: Prepared, build_loader=build_dataloader) -> int:
    """Process group up, train, and always tear down (metrics flushed, group destroyed)."""
    config, launch = prepared.config, prepared.launch
    faults.set_context(rank=launch.rank)
    stops = signals.install_early()
    watchdog = faults.Watchdog(config.engine.watchdog_seconds, launch.rank).start()
    metrics, trainer, comm, code = None, None, None, faults.EXIT_FAILED
    try:
        comm = start_process_group(config, launch)
        resume = choose_checkpoint(prepared, comm)
        if launch.rank == 0:
            config.run.directory.mkdir(parents=True, exist_ok=True)
            save_config(config, config.run.directory / "config.yaml")
        objective = build_objective(config)
        model = build_model(config, objective, log=functools.partial(print, flush=True) if launch.rank == 0 else None)
        saved_world = resume.saved["world_size"] if resume else None
        engine = build_engine(config, model, comm, ds_config=prepared.ds_config, saved_world_size=saved_world)
        torch.manual_seed(config.run.seed * 1000 + 1 + launch.rank)  # dropout etc. differ per rank
        loader = build_loader(config, launch, comm)
        from vitscale.metrics import TrainingMetrics

        metrics = TrainingMetrics(config.metrics, rank=launch.rank, local_rank=launch.local_rank,
                                  world_size=launch.world_size, job_id=launch.job_id, model_name=config.model.label,
                                  run_dir=config.run.directory, gather_objects=comm.all_gather_object)
        trainer = Trainer(config, launch, engine, objective, build_backward(config), loader, metrics, stops,
                          watchdog, evaluators=build_evaluators(config, launch),
                          forward_timer=ForwardTimer(engine.module, engine.device),
                          checkpoint_async=engine.device.type == "cuda" if config.engine.checkpoint_async is None
                          else config.engine.checkpoint_async)
        if launch.rank == 0:
            trainer.log_file = open(config.run.directory / "log.jsonl", "a")
        if resume is not None:
            metrics.record_rejected_checkpoints(len(resume.rejected))
            load_checkpoint(trainer, resume.path, resume.saved)
            trainer.log({"step": trainer.state.step, "resumed_from": str(resume.path),
                         "rejected_checkpoints": resume.rejected})  # later records of a step supersede earlier ones
        check_ranks_agree_on_data(trainer)
        watchdog.beat()
        code = train(trainer)
        trainer.say(f"done: {faults.describe_exit(code)} at step {trainer.state.step}")
    except VitscaleError as error:
        _print_error(error, launch, every_rank=True)
        code = error.exit_code
    except Exception as error:  # noqa: BLE001 - only collective failures are handled here
        if is_collective_failure(error):
            print(f"vitscale: rank {launch.rank}: a collective timed out or failed (engine.collective_timeout_seconds="
                  f"{config.engine.collective_timeout_seconds:g}): another rank hung or died "
                  f"({str(error).splitlines()[0][:200] if str(error) else type(error).__name__})",
                  file=sys.stderr, flush=True)
            code = faults.EXIT_HUNG
        else:
            traceback.print_exc()  # here: leaving below skips Python's own report of the exception
            code = faults.EXIT_FAILED
    finally:
        watchdog.stop()
        if metrics is not None:
            metrics.close()
        if trainer is not None and trainer.log_file is not None:
            trainer.log_file.close()
        leave(code, comm)
    return code


def leave(code: int, comm: Communicator | None) -> None:
    """Tear down. After a normal end or an agreed stop every rank is here: they meet once more,
    so that rank 0 (which hosts the group's store) leaves last, and destroy the group. After a
    failure a peer may be gone or elsewhere: exit at once (a C++ destructor aborting on a dead
    store would turn exit 2 into -6; a barrier could meet some other collective)."""
    if code in (faults.EXIT_OK, faults.EXIT_STOPPED):
        with contextlib.suppress(Exception):  # a peer died while leaving: exit below, the code stands
            if comm is not None:
                comm.barrier()
            stop_process_group()
            return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _print_error(error: VitscaleError, launch: Launch, every_rank: bool = False) -> None:
    """Config errors (before any process group) fail identically on every rank: one line per
    node. Errors of the running job may be one rank's own: every rank prints, with its rank."""
    if every_rank and launch.world_size > 1:
        print(f"vitscale train: rank {launch.rank}: error: {error}", file=sys.stderr, flush=True)
    elif launch.local_rank == 0:
        print(f"vitscale train: error: {error}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """`vitscale train` and the script entry point."""
    launch = Launch.from_environment(getattr(args, "local_rank", None))
    try:
        prepared = prepare(args)
    except VitscaleError as error:
        _print_error(error, launch)
        return error.exit_code
    return main_job(prepared)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitscale/train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    # Intermixed: `--config a.yaml optim.lr=1e-3 --ds_config z.json model.name=L/16` is fine too.
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
