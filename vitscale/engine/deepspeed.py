"""engine.kind=deepspeed (the default): DeepSpeed ZeRO-0/1/2/3 around the model and our optimizer.

    deepspeed vitscale/train.py --ds_config configs/zero2.json --config configs/vit_b16_i21k.yaml

Everything DeepSpeed-specific lives here and in ds_config.py. The DeepSpeed JSON is derived from
the config tree (ds_config.py); the optimizer is torch's fused AdamW/SGD, which ZeRO steps on its
flat fp32 partitions. Skipping a step: the loop's agreed non-finite-loss flag and the global
gradient norm DeepSpeed has just all-reduced are combined on the device and handed to the fused
kernel as `found_inf` right before DeepSpeed calls the base optimizer; the host never waits.

Checkpoints are DeepSpeed's own files, written atomically and read with weights_only loads.
Resuming on another number of ranks goes through DeepSpeed's universal checkpoint: rank 0
converts the checkpoint once (ds_to_universal, into step_XXXXXXXX/universal/), and the engine is
started with `checkpoint.load_universal`, which re-partitions the fp32 master weights and the
optimizer moments for the new world size (copies: exact bit for bit).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitscale.engine import checkpoint as ckpt
from vitscale.engine import staging
from vitscale.engine.base import StepOutcome
from vitscale.engine.distributed import Communicator
from vitscale.engine.ds_config import fill_bucket_sizes
from vitscale.engine.optim import build_optimizer, step_unless
from vitscale.errors import CheckpointError, ConfigError

UNIVERSAL_DIR = "universal"


def quiet_library_logs() -> None:
    """DeepSpeed logs every internal step at INFO; the engine prints its own progress lines."""
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    # Our optimizers are torch's AdamW / SGD, which ZeRO partitions like any other.
    deepspeed_logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated")


def _adopt_process_group(comm: Communicator) -> None:
    import deepspeed
    import deepspeed.ops

    if comm.device.type == "cpu":
        # DeepSpeed's shared-memory all-reduce serves inference only; skipping it saves a JIT
        # compile at start-up and keeps every collective under gloo's timeout.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if comm.device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False)


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, config, model: nn.Module, comm: Communicator, ds_config: dict[str, Any], *,
                 universal_resume: bool = False):
        import deepspeed

        quiet_library_logs()
        _adopt_process_group(comm)
        self.comm, self.device = comm, comm.device
        self.precision, self.stage = config.engine.precision, config.engine.zero_stage
        optimizer = build_optimizer(config.optim, model)
        ds = fill_bucket_sizes(dict(ds_config), sum(p.numel() for p in model.parameters()))
        if universal_resume:
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        try:
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        except ValueError as error:
            if "not supported on your device" not in str(error):
                raise
            raise ConfigError("engine.precision", f"{self.precision}: {error}", "use bf16 or fp32 here") from None
        self.engine.checkpoint_engine = build_checkpoint_engine(self.engine._config,
                                                                staging.HostStager(pin=self.device.type == "cuda"))
        self.writer = staging.BackgroundWriter("vitscale-deepspeed-checkpoint")
        _record_recovery_script_failures(self.engine)
        self.module, self.train_module = self.engine.module, self.engine
        self.base_optimizer = optimizer
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self._pending_skip: torch.Tensor | None = None
        self._decided: torch.Tensor | None = None
        _step_with_device_decision(optimizer, self._decide_skip)

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups  # read through: loading replaces the list

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed holds the module in the training precision

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        # The loop says where the boundary is (gradient reduction, ZeRO-2 bucket flush), so the
        # engine is stepped once per optimizer step instead of once per micro-batch.
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def step(self, skip: torch.Tensor) -> StepOutcome:
        self._pending_skip, self._decided = skip.to(self.device), None
        self.engine.step()
        decided = self._decided if self._decided is not None else self._pending_skip
        if not self.engine.was_step_applied():
            # DeepSpeed's own overflow check skipped the update (fp16 loss scaling, or a
            # non-finite norm under ZeRO-3/fp32): the same on every rank, already on the host.
            decided = torch.ones((), dtype=torch.bool, device=self.device)
        self.engine.zero_grad()
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not isinstance(norm, torch.Tensor):
            norm = torch.tensor(float(norm), device=self.device)
        return StepOutcome(skipped=decided, grad_norm=norm)

    def _decide_skip(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Called inside DeepSpeed's step, before each base-optimizer call (ZeRO-1/2 step one
        parameter group at a time): one decision per step, shared by every call."""
        if self._decided is None:
            norm = getattr(self.engine.optimizer, "_global_grad_norm", None)  # ZeRO-1/2: all-reduced already
            if isinstance(norm, torch.Tensor):
                bad = ~torch.isfinite(norm.to(self.device))
            else:  # this rank's partition only: agree over ranks (one device all-reduce, no sync)
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                local = ~torch.isfinite(torch.nn.utils.get_total_norm(grads)).to(self.device) if grads \
                    else torch.zeros((), dtype=torch.bool, device=self.device)
                bad = self.comm.device_any(local)
            pending = self._pending_skip if self._pending_skip is not None else torch.zeros_like(bad)
            self._decided = pending | bad
        return self._decided

    # -----------------------------------------------------------------------------------------
    # Checkpoints.

    @property
    def saved_files(self) -> list[Path]:
        return list(self.engine.checkpoint_engine.written)

    def save(self, path: Path) -> str | None:
        engine_io = self.engine.checkpoint_engine
        engine_io.failure, engine_io.written = None, []
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={}, save_latest=False)
        return engine_io.failure

    def save_async(self, path: Path) -> Future:
        """DeepSpeed's save_checkpoint with the staging engine: each state dict it hands over is
        copied to host memory (the step waits for that), then written by the background thread."""
        engine_io = self.engine.checkpoint_engine
        engine_io.failure, engine_io.written, engine_io.staged = None, [], []
        try:
            self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={}, save_latest=False)
        finally:
            staged, engine_io.staged = engine_io.staged, None
        if engine_io.failure:
            return staging.resolved(engine_io.failure)

        def write() -> str | None:
            for state, file in staged:
                ckpt.torch_save_atomic(state, file)
                engine_io.written.append(file)
            return None

        return self.writer.submit(write)

    def load(self, path: Path, *, saved_world_size: int) -> None:
        tag = path.name
        if saved_world_size != self.comm.world_size:
            if self.comm.broadcast_object(_convert_to_universal(path) if _is_rank0() else None) is not None:
                raise CheckpointError(f"{path}: cannot convert it for {self.comm.world_size} ranks")
            tag = f"{path.name}/{UNIVERSAL_DIR}"
        with ckpt.torch_load_weights_only():
            loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no engine state in {path}")
        # ZeRO-3's universal load gives every sub-group's state the same `step` tensor; the fused
        # kernel increments each in place, so a shared one would count every step once per
        # sub-group (wrong bias correction). One tensor each:
        for state in self.base_optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        # Per-element optimizer state (AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer), as the
        # base optimizer holds it for its flat partitions; the same keys on every rank.
        keys = sorted({key for state in self.base_optimizer.state.values() for key, value in state.items()
                       if torch.is_tensor(value) and value.dim() > 0})
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each parameter to its optimizer-state fragments once, after the first
            # step of group 0, when the other groups' states do not exist yet: link them again.
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        full = {}
        for name, param in self.module.named_parameters():
            entry = {"fp32": safe_get_full_fp32_param(param).detach().cpu().clone()}
            for key in keys:  # collectives: every rank asks for the same tensors in the same order
                entry[key] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
            full[name] = entry
        step = self._optimizer_step_count()
        for entry in full.values():
            entry["step"] = step
        return full

    def _optimizer_step_count(self) -> torch.Tensor:
        """Adam's step count (bias correction), the same for every partition."""
        for state in self.base_optimizer.state.values():
            if "step" in state:
                return torch.as_tensor(state["step"]).detach().cpu().clone()
        return torch.zeros(())


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _convert_to_universal(path: Path) -> str | None:
    """Rank 0: DeepSpeed's ds_to_universal into path/universal (once; reused by later resumes).
    Returns the failure as text, None when the universal checkpoint is ready."""
    from deepspeed.checkpoint import ds_to_universal

    target = path / UNIVERSAL_DIR
    done = target / ckpt.COMPLETE_MARKER
    if done.is_file():
        return None
    shutil.rmtree(target, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with ckpt.torch_load_weights_only(), contextlib.redirect_stdout(None):
            ds_to_universal.main(args)
        for model_file in path.glob("*model_states.pt"):  # the engine reads module and client state there
            shutil.copy2(model_file, target / model_file.name)
        ckpt.mark_complete(target, {"converted_from": str(path)})
    except Exception as error:  # noqa: BLE001 - reported to every rank as one line
        shutil.rmtree(target, ignore_errors=True)
        text = str(error).strip().splitlines()
        return text[0][:300] if text else type(error).__name__
    return None


def build_checkpoint_engine(config_params: Any = None, stager: staging.HostStager | None = None):
    """A DeepSpeed checkpoint engine that writes atomically and loads with weights_only.

    A failed write (full disk) is recorded in `.failure` instead of raised, so the rank stays in
    step with DeepSpeed's barriers; `save_checkpoint` then decides with every rank. `.written`
    lists the files written, for the checkpoint's manifest. While `.staged` is a list (an
    asynchronous save), `save` copies each state dict to host memory with `stager` and queues it
    there instead of writing it: DeepSpeed's own decoupled engine hands the live tensors to a
    subprocess through its aio writer and waits for the write at the next optimizer step, so it
    overlaps one step at most; this one overlaps every step until the write is done."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from vitscale.engine.checkpoint import safe_torch_load, torch_save_atomic

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.failure: str | None = None
            self.written: list[Path] = []
            self.staged: list[tuple[Any, Path]] | None = None

        def save(self, state_dict, path):
            if self.failure is not None:
                return
            try:
                if self.staged is not None:
                    self.staged.append((stager.stage(state_dict, key=Path(path).name), Path(path)))
                    return
                torch_save_atomic(state_dict, Path(path))
                self.written.append(Path(path))
            except (OSError, RuntimeError) as error:  # torch.save's ENOSPC, staging's host OOM: RuntimeError
                self.failure = f"{Path(path).name}: {getattr(error, 'strerror', None) or error}"

        def load(self, path, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    return SafeCheckpointEngine(config_params)


def _step_with_device_decision(optimizer: torch.optim.Optimizer, decide) -> None:
    """Route DeepSpeed's calls of optimizer.step() through step_unless with the engine's flag."""
    plain_step = optimizer.step

    def step(closure=None):
        optimizer.step = plain_step  # step_unless calls the real step
        try:
            step_unless(optimizer, decide(optimizer))
        finally:
            optimizer.step = step

    optimizer.step = step


def _record_recovery_script_failures(engine) -> None:
    """DeepSpeed copies zero_to_fp32.py next to the checkpoints with a plain file copy between its
    barriers; a full disk there must be recorded like any failed write, not raised mid-protocol."""
    copy = engine._copy_recovery_script

    def guarded(save_path):
        try:
            copy(save_path)  # into the checkpoints/ folder, not the checkpoint: not in its manifest
        except OSError as error:
            engine.checkpoint_engine.failure = engine.checkpoint_engine.failure or \
                f"zero_to_fp32.py: {error.strerror or error}"

    engine._copy_recovery_script = guarded


# ---------------------------------------------------------------------------------------------
# Reading a DeepSpeed checkpoint's weights in one process (export, fine-tuning).


def is_deepspeed_checkpoint(directory: Path) -> bool:
    return ((directory / "mp_rank_00_model_states.pt").is_file()
            or any(directory.glob("*zero_pp_rank_*_optim_states.pt")))


def read_deepspeed_weights(directory: Path) -> dict[str, torch.Tensor]:
    """fp32 weights: merged from the ZeRO optimizer partitions when there are any (the exact
    master weights, and the only complete copy under ZeRO-3), else the module states."""
    if any(directory.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with ckpt.torch_load_weights_only():
                return get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise CheckpointError(f"{directory}: cannot consolidate its ZeRO partitions ({first_line}); "
                                  "resume it with the world size that wrote it, or start from exported "
                                  "weights") from None
    states = ckpt.safe_torch_load(directory / "mp_rank_00_model_states.pt")
    module = states.get("module") if isinstance(states, dict) else None
    if not module:
        raise CheckpointError(f"{directory} holds no module weights")
    return module
