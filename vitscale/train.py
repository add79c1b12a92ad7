"""The main job: WebDataset shards -> ViT -> DeepSpeed ZeRO, with checkpoints, evaluation and faults.

    deepspeed vitscale/train.py --ds_config configs/zero2.json --config configs/vit_b16_i21k.yaml
    torchrun --nproc_per_node 8 vitscale/train.py --ds_config configs/zero2.json --config ... KEY=VALUE
    vitscale train --config configs/vit_b16_i21k_tiny.yaml data.train_shards=DIR   (one process)

Everything a user can get wrong (config, DeepSpeed JSON, batch sizes, shards, the checkpoint to
resume) is checked in `prepare` before any process group starts. The loop is in small pieces:
build_model, build_dataloader, build_engine, train_step, evaluate, save_checkpoint,
load_checkpoint. Exit codes: see vitscale/engine/faults.py (0 done, 2 bad input, 3 too many
non-finite steps, 4 hang, 5 final checkpoint failed, 75 stopped on a signal after saving).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script, vitscale/ itself is first on sys.path and vitscale/data, vitscale/config.py
    # ... would shadow top-level modules of the same name.
    sys.path.pop(0)

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from datetime import timedelta
from typing import Any, Iterator

import torch
from torch import nn

from vitscale.config import Config, add_config_arguments, load_config, save_config
from vitscale.engine import checkpoint as ckpt
from vitscale.engine import faults
from vitscale.engine.distributed import Launch, all_reduce, any_rank, init_distributed
from vitscale.engine.ds_config import deepspeed_config, fill_bucket_sizes, read_ds_json, resolve_zero_stage
from vitscale.engine.evaluate import evaluate, input_dtype
from vitscale.engine.objectives import build_objective
from vitscale.engine.optim import build_optimizer, learning_rate, set_learning_rate
from vitscale.errors import CheckpointError, ConfigError, VitscaleError
from vitscale.evaluation.fewshot import FewShotEvaluator


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
    resume_from: Path | None


def prepare(args: argparse.Namespace) -> Prepared:
    """Load and check everything; raises VitscaleError before any process group exists."""
    launch = Launch.from_environment(getattr(args, "local_rank", None))
    overrides = list(args.overrides or [])
    if args.ds_config:
        overrides.append(f"engine.ds_config={args.ds_config}")
    config = load_config(args.config, overrides)
    ds_json = read_ds_json(config.engine.ds_config) if config.engine.ds_config else None
    if ds_json is not None:
        stage_override = any(item.lstrip("-").startswith("engine.zero_stage=") for item in args.overrides or [])
        resolve_zero_stage(config, ds_json, stage_override)
        config.validate()
    ds = deepspeed_config(config, launch.world_size, ds_json)
    check_shards(config)
    return Prepared(config, ds, launch, find_resume_checkpoint(config, launch.world_size))


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


def find_resume_checkpoint(config: Config, world_size: int) -> Path | None:
    mode, run_dir = config.engine.resume.strip(), config.run.directory
    if mode == "never":
        if ckpt.latest_complete(run_dir) is not None:
            raise ConfigError("engine.resume", f"is never but {run_dir} already holds checkpoints",
                              "use another run.name, or engine.resume=auto to continue that run")
        return None
    path = ckpt.latest_complete(run_dir) if mode == "auto" else ckpt.resolve_checkpoint(mode)
    if path is not None:
        read_trainer_state(path, world_size)
    return path


def read_trainer_state(path: Path, world_size: int) -> dict[str, Any]:
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}/trainer.json is unreadable ({error}); pick another checkpoint") from None
    if trainer.get("world_size") != world_size:
        raise CheckpointError(f"{path} was written by {trainer.get('world_size')} ranks, this job has "
                              f"{world_size}; resume with the same world size, or export it "
                              "(`vitscale export`) and start a new run from the weights")
    return trainer


# ---------------------------------------------------------------------------------------------
# Building blocks.


def build_model(config: Config, objective: Any) -> nn.Module:
    """The ViT (fine-tuning: initialised from finetune.init_from), plus any parameters the
    objective adds; identical on every rank (same seed)."""
    torch.manual_seed(config.run.seed)
    finetune = getattr(config, "finetune", None)
    if finetune is not None and finetune.init_from:
        from vitscale.research.finetune import build_finetune_model

        model = build_finetune_model(config)
    else:
        from vitscale.model import build_model as build_vit

        model = build_vit(config.model)
    if hasattr(objective, "attach"):
        objective.attach(model)
    model.checkpoint_blocks = config.engine.activation_checkpointing
    return model


def build_dataloader(config: Config, launch: Launch):
    from vitscale.data import build_train_loader

    return build_train_loader(config.data, micro_batch_size=config.engine.micro_batch_size,
                              image_size=config.model.image_size, num_classes=config.model.num_classes,
                              rank=launch.rank, world_size=launch.world_size, seed=config.run.seed,
                              run_dir=config.run.directory)


def build_engine(config: Config, model: nn.Module, ds: dict[str, Any]):
    """DeepSpeed engine around the model and our optimizer; checkpoints written atomically and
    read with weights_only."""
    import deepspeed

    optimizer = build_optimizer(config.optim, model)
    ds = fill_bucket_sizes(ds, sum(p.numel() for p in model.parameters()))
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    except ValueError as error:
        if "not supported on your device" not in str(error):
            raise
        raise ConfigError("engine.precision", f"{config.engine.precision}: {error}", "use bf16 or fp32 here") from None
    engine.checkpoint_engine = ckpt.build_checkpoint_engine(engine._config)
    _record_recovery_script_failures(engine)
    optimizer.nonfinite_check = any_rank
    if config.engine.compile:
        engine.compile()
    return engine, optimizer


def _record_recovery_script_failures(engine) -> None:
    """DeepSpeed copies zero_to_fp32.py next to the checkpoints with a plain file copy between its
    barriers; a full disk there must be recorded like any failed write, not raised mid-protocol."""
    copy = engine._copy_recovery_script

    def guarded(save_path):
        try:
            copy(save_path)
        except OSError as error:
            engine.checkpoint_engine.failure = engine.checkpoint_engine.failure or \
                f"zero_to_fp32.py: {error.strerror or error}"

    engine._copy_recovery_script = guarded


# ---------------------------------------------------------------------------------------------
# The loop.


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
    device: torch.device
    engine: Any
    optimizer: Any
    objective: Any
    loader: Any
    metrics: Any
    stops: faults.StopRequests
    watchdog: faults.Watchdog
    state: TrainerState = field(default_factory=TrainerState)
    batches: Iterator | None = None
    log_file: Any = None
    fewshot: Any = None            # FewShotEvaluator when fewshot.every > 0

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

        peak = peak_flops(self.device, self.config.engine.precision, self.config.engine.peak_flops)
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
    loss: float            # mean over the global batch (every rank, every micro-batch)
    skipped: bool
    stop: int              # faults.STOP_* agreed by every rank
    data_wait_seconds: float
    loss_scale_skip: bool = False


def train_step(t: Trainer) -> StepResult:
    """One optimizer step over `accumulation` micro-batches; every rank decides together whether
    it is skipped (non-finite loss or gradient anywhere) and whether to stop afterwards."""
    import torch.distributed as dist

    engine, config = t.engine, t.config
    set_learning_rate(engine.optimizer, learning_rate(t.state.step, config))
    losses, data_wait = [], 0.0
    for index in range(t.accumulation):
        started = time.perf_counter()
        images, targets = next(t.batches)
        data_wait += time.perf_counter() - started
        images = images.to(t.device, dtype=input_dtype(config), non_blocking=True)
        targets = targets.to(t.device, non_blocking=True)
        loss = micro_batch_backward(t, images, targets)
        losses.append(loss.detach().float())
        if index == t.accumulation - 1:
            # The guard inside optimizer.step() skips the update on every rank if any rank saw
            # a non-finite loss or holds a non-finite gradient (it all-reduces the flag).
            step_loss = torch.stack(losses)
            nonfinite_loss = not bool(torch.isfinite(step_loss).all())
            t.optimizer.skip_next = nonfinite_loss
            t.optimizer.last_step_skipped = None
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
    guard_result = t.optimizer.last_step_skipped
    # None: DeepSpeed itself skipped the update (its overflow check), on every rank alike. Under
    # fp16 with finite losses that is dynamic loss scaling finding its scale, not a fault.
    skipped = True if guard_result is None else guard_result
    loss_sum, count, term, requeue, nonfinite_losses = all_reduce(
        [float(step_loss.nan_to_num(0.0).sum()), float(len(losses)), float(t.stops.requested == faults.STOP_TERM),
         float(t.stops.requested == faults.STOP_REQUEUE), float(nonfinite_loss)],
        dist.ReduceOp.SUM)
    loss_scale_skip = guard_result is None and config.engine.precision == "fp16" and not nonfinite_losses
    stop = faults.STOP_REQUEUE if requeue else faults.STOP_TERM if term else faults.STOP_NONE
    mean_loss = float("nan") if skipped else loss_sum / count
    return StepResult(mean_loss, skipped, stop, data_wait, loss_scale_skip)


def micro_batch_backward(t: Trainer, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    config, engine = t.config, t.engine
    if config.optim.name in ("sam", "gsam"):
        from vitscale.research.sam import settings_from_config, sharpness_aware_backward

        settings = settings_from_config(config)
        lr = engine.optimizer.param_groups[0]["lr"]
        holder: dict[str, torch.Tensor] = {}

        def loss_fn() -> torch.Tensor:
            # The bare module: an engine forward arms DeepSpeed's gradient reduction, which must
            # run only for the final backward of the SAM/GSAM direction (sharpness_aware_backward).
            holder["loss"] = t.objective.loss(engine.module, images, targets)[0]
            return holder["loss"]

        sharpness_aware_backward(loss_fn, list(engine.module.parameters()), engine.backward,
                                 rho=settings.rho(lr), alpha=settings.alpha)
        return holder["loss"]
    loss, _ = t.objective.loss(engine, images, targets)
    if faults.maybe_inject("loss") == "nan_loss":
        loss = loss * float("nan")
    engine.backward(loss)
    return loss


def train(t: Trainer) -> int:
    """Steps until run.steps, a stop request, or too many non-finite steps. Returns the exit code."""
    config, state = t.config, t.state
    total = config.run.steps
    images_per_step = config.engine.global_batch_size
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
        t.watchdog.beat()
        window_steps += 1
        if result.loss_scale_skip:
            t.say(f"step {state.step}: fp16 gradients overflowed; DeepSpeed lowered the loss scale and skipped it")
        elif result.skipped:
            code = record_nonfinite(t)
            if code is not None:
                return code
        else:
            state.consecutive_nonfinite = 0
        record_step(t, result, step_seconds, images_per_step)
        if state.step % config.run.log_every == 0 or state.step == total:
            rate = images_per_step * window_steps / max(time.perf_counter() - window_started, 1e-9)
            log_progress(t, result, rate)
            window_started, window_steps = time.perf_counter(), 0
        if config.engine.eval_every and state.step % config.engine.eval_every == 0 and state.step < total:
            run_evaluation(t)
        if t.fewshot is not None and state.step % config.fewshot.every == 0:
            run_fewshot(t)
        if result.stop:
            return stop_on_request(t, result.stop)
        if config.engine.checkpoint_every and state.step % config.engine.checkpoint_every == 0 \
                and state.step < total:
            save_checkpoint(t)
    if config.data.eval_shards:
        run_evaluation(t)
    return faults.EXIT_OK if save_checkpoint(t) else faults.EXIT_CHECKPOINT_FAILED


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


def record_step(t: Trainer, result: StepResult, step_seconds: float, images_per_step: int) -> None:
    world = t.launch.world_size
    images = images_per_step // world
    tokens = images * t.tokens_per_image
    loss = result.loss if not result.skipped else float("nan")
    t.metrics.record_step(t.state.step, loss, learning_rate(t.state.step - 1, t.config), _grad_norm(t), images,
                          tokens, step_seconds, result.data_wait_seconds, _mfu(t, images / max(step_seconds, 1e-9)))
    if t.state.step % t.config.run.log_every == 0:
        gather_rank_times(t, step_seconds, result.data_wait_seconds)
        t.metrics.record_skipped_samples(t.loader.skipped_samples())


def gather_rank_times(t: Trainer, step_seconds: float, data_wait: float) -> None:
    import torch.distributed as dist

    mine = torch.tensor([step_seconds, data_wait], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(t.launch.world_size)]
    dist.all_gather(every, mine)
    if t.is_main:
        t.metrics.record_rank_times([float(x[0]) for x in every], [float(x[1]) for x in every])


def _grad_norm(t: Trainer) -> float:
    norm = t.engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _mfu(t: Trainer, images_per_second_per_rank: float) -> float | None:
    scale = t.mfu_per_image_per_second
    return None if scale is None else scale * images_per_second_per_rank


def log_progress(t: Trainer, result: StepResult, images_per_second: float) -> None:
    state, total = t.state, t.config.run.steps
    seconds_left = (total - state.step) * t.config.engine.global_batch_size / max(images_per_second, 1e-9)
    mfu = _mfu(t, images_per_second / t.launch.world_size)
    lr = learning_rate(state.step - 1, t.config)
    t.log({"step": state.step, "loss": None if result.skipped else result.loss, "lr": lr,
           "grad_norm": None if result.skipped else _grad_norm(t), "images_per_second": images_per_second,
           "tokens_per_second": images_per_second * t.tokens_per_image, "mfu": mfu,
           "elapsed_seconds": state.elapsed_seconds, "nonfinite_total": state.nonfinite_total})
    t.say(f"step {state.step}/{total} | loss {result.loss:.4f} | lr {lr:.2e} | {images_per_second:,.0f} images/s"
          f"{f' | MFU {mfu:.1%}' if mfu is not None else ''} | ETA {timedelta(seconds=round(seconds_left))}")


def stop_on_request(t: Trainer, stop: int) -> int:
    what = "SIGUSR1 (pre-emption warning)" if stop == faults.STOP_REQUEUE else "SIGTERM"
    t.say(f"step {t.state.step}: {what} received by some rank; every rank saves this step and exits")
    saved = save_checkpoint(t)
    if stop == faults.STOP_REQUEUE and t.is_main and saved:
        faults.requeue_slurm_job()
    return faults.EXIT_STOPPED if saved else faults.EXIT_CHECKPOINT_FAILED


# ---------------------------------------------------------------------------------------------
# Evaluation.


def run_evaluation(t: Trainer) -> dict[str, float]:
    if not t.config.data.eval_shards or t.config.run.objective != "classification":
        return {}
    values = evaluate(t.engine, t.config, rank=t.launch.rank, world_size=t.launch.world_size, device=t.device,
                      beat=t.watchdog.beat)
    t.metrics.record_eval(values)
    t.log({"step": t.state.step, "eval": values})
    t.say(f"step {t.state.step}: eval " + ", ".join(f"{k} {v:.4f}" if k != "samples" else f"{k} {v:.0f}"
                                                    for k, v in values.items()))
    return values


def run_fewshot(t: Trainer) -> dict[str, float]:
    """The paper's few-shot linear evaluation of the frozen representation. Every rank runs it on
    the whole few-shot data: ZeRO-3's forward is collective, and elsewhere it keeps the ranks in
    step instead of leaving them waiting in the next collective."""
    t.watchdog.beat()
    values = t.fewshot.evaluate(t.engine.module, device=t.device)
    t.watchdog.beat()
    t.metrics.record_eval(values)
    t.log({"step": t.state.step, "eval": values})
    t.say(f"step {t.state.step}: few-shot " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return values


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(t: Trainer) -> bool:
    """Every rank writes its part; COMPLETE is written only after every rank reported success.
    A failure (full disk, ...) is reported and leaves the previous complete checkpoint in place."""
    import torch.distributed as dist

    path = ckpt.checkpoint_dir(t.run_dir, t.state.step)
    if ckpt.is_complete(path):
        return True  # resumed at this very step: it is already saved
    started = time.perf_counter()
    t.watchdog.beat()
    if t.is_main and path.exists():
        shutil.rmtree(path)  # left by an interrupted attempt at this step
    dist.barrier()
    failure = write_checkpoint_files(t, path)
    ok = all_reduce([0.0 if failure else 1.0], dist.ReduceOp.MIN)[0] > 0
    if failure:
        print(f"vitscale: rank {t.launch.rank}: checkpoint {path} failed: {failure}", file=sys.stderr, flush=True)
    if t.is_main:
        ok = finish_checkpoint(t, path, ok)
    ok = all_reduce([1.0 if ok else 0.0], dist.ReduceOp.MIN)[0] > 0  # every rank learns rank 0's verdict
    t.watchdog.beat()
    seconds = time.perf_counter() - started
    t.metrics.record_checkpoint(seconds, ok)
    t.log({"step": t.state.step, "checkpoint": str(path) if ok else None, "checkpoint_ok": ok,
           "checkpoint_seconds": seconds})
    if ok:
        t.say(f"step {t.state.step}: saved {path} in {seconds:.1f} s")
    else:
        t.say(f"step {t.state.step}: checkpoint FAILED (see the rank errors above); the latest complete "
              f"checkpoint is still {ckpt.latest_complete(t.run_dir)}")
    return ok


def finish_checkpoint(t: Trainer, path: Path, ok: bool) -> bool:
    """Rank 0, after every rank wrote its files: the COMPLETE marker and retention; on failure,
    remove the partial directory so it costs no disk."""
    if ok:
        try:
            ckpt.mark_complete(path, {"step": t.state.step, "world_size": t.launch.world_size})
            ckpt.apply_retention(t.run_dir, t.config.engine.keep_last)
            return True
        except OSError as error:
            print(f"vitscale: rank 0: checkpoint {path} failed: {error.strerror or error}", file=sys.stderr, flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return False


def write_checkpoint_files(t: Trainer, path: Path) -> str | None:
    """This rank's files; returns the first failure as text instead of raising, so every rank
    reaches the same collectives."""
    engine_io = t.engine.checkpoint_engine
    engine_io.failure = None
    t.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={}, save_latest=False)
    if engine_io.failure:
        return engine_io.failure
    try:
        ckpt.torch_save_atomic({"rng": ckpt.rng_state(), "loader": t.loader.state_dict(), "step": t.state.step,
                                "rank": t.launch.rank}, ckpt.rank_state_path(path, t.launch.rank))
        if t.is_main:
            ckpt.write_json(path / "trainer.json", {**t.state.__dict__, "world_size": t.launch.world_size})
            save_config(t.config, path / "config.yaml")
    except OSError as error:
        return f"{error.strerror or error}"
    return None


def load_checkpoint(t: Trainer, path: Path) -> None:
    """Engine (weights, optimizer, ZeRO partitions), data position, RNG states and counters."""
    trainer = read_trainer_state(path, t.launch.world_size)
    loaded, _ = t.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no engine state in {path}")
    rank_state = ckpt.safe_torch_load(ckpt.rank_state_path(path, t.launch.rank))
    t.loader.load_state_dict(rank_state["loader"])
    ckpt.set_rng_state(rank_state["rng"])
    t.state = TrainerState(**{k: trainer[k] for k in TrainerState.__dataclass_fields__ if k in trainer})
    t.say(f"resumed from {path} at step {t.state.step}")
    t.log({"step": t.state.step, "resumed_from": str(path)})  # later records of a step supersede earlier ones


# ---------------------------------------------------------------------------------------------
# Entry points.


def main_job(prepared: Prepared, build_loader=build_dataloader) -> int:
    """Process group up, train, and always tear down (metrics flushed, group destroyed)."""
    import torch.distributed as dist

    config, launch = prepared.config, prepared.launch
    faults.set_context(rank=launch.rank)
    stops = faults.StopRequests().install()
    watchdog = faults.Watchdog(config.engine.watchdog_seconds, launch.rank).start()
    metrics, trainer, code = None, None, faults.EXIT_FAILED
    try:
        device = init_distributed(config, launch)
        if launch.rank == 0:
            config.run.directory.mkdir(parents=True, exist_ok=True)
            save_config(config, config.run.directory / "config.yaml")
        objective = build_objective(config)
        model = build_model(config, objective)
        engine, optimizer = build_engine(config, model, prepared.ds_config)
        torch.manual_seed(config.run.seed * 1000 + 1 + launch.rank)  # dropout etc. differ per rank
        loader = build_loader(config, launch)
        from vitscale.metrics import TrainingMetrics

        metrics = TrainingMetrics(config.metrics, rank=launch.rank, local_rank=launch.local_rank,
                                  world_size=launch.world_size, job_id=launch.job_id, model_name=config.model.name,
                                  run_dir=config.run.directory)
        trainer = Trainer(config, launch, device, engine, optimizer, objective, loader, metrics, stops, watchdog)
        trainer.fewshot = FewShotEvaluator.from_config(config)
        if launch.rank == 0:
            trainer.log_file = open(config.run.directory / "log.jsonl", "a")
        if prepared.resume_from is not None:
            load_checkpoint(trainer, prepared.resume_from)
        watchdog.beat()
        code = train(trainer)
        trainer.say(f"done: {faults.describe_exit(code)} at step {trainer.state.step}")
    except VitscaleError as error:
        _print_error(error, launch)
        code = error.exit_code
    except RuntimeError as error:
        if not _is_collective_timeout(error):
            raise
        print(f"vitscale: rank {launch.rank}: a collective timed out after "
              f"{config.engine.collective_timeout_seconds:g} s (engine.collective_timeout_seconds): another rank "
              f"hung or died ({str(error).splitlines()[0][:200]})", file=sys.stderr, flush=True)
        code = faults.EXIT_HUNG
    finally:
        watchdog.stop()
        if metrics is not None:
            metrics.close()
        if trainer is not None and trainer.log_file is not None:
            trainer.log_file.close()
        if code == faults.EXIT_HUNG:
            os._exit(code)  # a peer may be gone: destroying the group could block on it
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


def _is_collective_timeout(error: RuntimeError) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text or "connection closed by peer" in text \
        or "connection reset" in text


def _print_error(error: VitscaleError, launch: Launch) -> None:
    # One line per node is enough: the same config fails identically on every rank.
    if launch.local_rank == 0:
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
