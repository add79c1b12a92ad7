"""Optimizer, schedule and engine sections of the config tree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vitscale.checks import require_finite, require_positive, require_range
from vitscale.errors import ConfigError


@dataclass
class OptimConfig:
    # Paper: Adam(W) for pretraining, SGD with momentum 0.9 for fine-tuning. sam / gsam wrap
    # optim.base_optimizer with a sharpness-aware gradient (vitscale/research/sam.py; ZeRO 0-2).
    name: Literal["adamw", "sgd", "sam", "gsam"] = "adamw"
    # Peak learning rate, reached at the end of warmup (paper: about 1e-3 at batch 4096 for
    # pretraining; the larger models use less); the schedule scales it.
    lr: float = 1e-3
    # Adam's moment decay rates and epsilon (paper: beta1 0.9, beta2 0.999).
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # Decoupled decay on weight matrices only: never on norms, biases, position embeddings
    # or the [class] token. The paper found high decay (0.1) helps pretraining.
    weight_decay: float = 0.1
    # SGD momentum (optim.name=sgd, or sam/gsam over sgd; paper fine-tuning: 0.9).
    momentum: float = 0.9
    # Clip the global gradient norm (paper: 1.0); 0 disables.
    grad_clip: float = 1.0
    # SAM / GSAM: the optimizer that applies their gradient; the radius rho of the weight
    # perturbation (GSAM: rho at the peak lr, falling linearly with the lr to rho_min; null keeps
    # it constant); GSAM's alpha, the weight of the surrogate-gap descent (paper ViT: 0.4 ... 0.6).
    base_optimizer: Literal["adamw", "sgd"] = "adamw"
    rho: float = 0.05
    rho_min: float | None = None
    alpha: float = 0.4

    def validate(self) -> None:
        require_positive(self, "optim", ("lr", "eps", "rho"))
        if self.rho_min is not None and not 0 <= self.rho_min <= self.rho:
            raise ConfigError("optim.rho_min", f"{self.rho_min} is not in [0, optim.rho={self.rho}]",
                              "use a value up to optim.rho, or null for a constant rho")
        require_range(self, "optim", "alpha", 0.0, 10.0)
        require_range(self, "optim", "beta1", 0.0, 0.999999)
        require_range(self, "optim", "beta2", 0.0, 0.999999)
        require_range(self, "optim", "momentum", 0.0, 0.999999)
        for name in ("weight_decay", "grad_clip", "beta1", "beta2", "momentum", "alpha"):
            require_finite(self, "optim", name)
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay" if self.weight_decay < 0 else "optim.grad_clip",
                              "must be >= 0", "use 0 to disable")


@dataclass
class ScheduleConfig:
    # Linear warmup (paper: 10k steps at batch 4096) then linear or cosine decay.
    warmup_steps: int = 10_000
    decay: Literal["linear", "cosine", "constant"] = "linear"
    # Final learning rate as a fraction of optim.lr.
    end_lr_ratio: float = 0.0
    # Horizon of the decay; None uses run.steps.
    total_steps: int | None = None

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps", "must be >= 0", "use 0 for no warmup")
        require_positive(self, "schedule", ("total_steps",))
        require_range(self, "schedule", "end_lr_ratio", 0.0, 1.0)


@dataclass
class EngineConfig:
    # Who runs backward, the optimizer step, communication and checkpoints (README "Engines"):
    # deepspeed (ZeRO-engine.zero_stage, the default), fsdp2 (torch fully_shard per block, DCP
    # checkpoints), local (one process, no wrapper: the reference).
    kind: Literal["deepspeed", "fsdp2", "local"] = "deepspeed"
    # DeepSpeed JSON (engine.kind=deepspeed only); its "auto" values are filled from this tree,
    # and explicit values must agree.
    ds_config: str | None = None
    # ZeRO stage (deepspeed): 0 replicates everything, 1 shards optimizer states, 2 also
    # gradients, 3 also parameters (FSDP2 always shards all three, like 3).
    zero_stage: int = 2
    # Compute precision: bf16 (fp32 master weights, optimizer states and gradient reduction),
    # fp16 (with DeepSpeed's dynamic loss scaling; deepspeed only) or fp32.
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Images per rank per forward pass (micro-batch) and images per optimizer step (global batch);
    # gradient accumulation = global / (micro x world size) and must be a whole number.
    micro_batch_size: int = 32
    global_batch_size: int = 4096
    # Recompute each encoder block's activations in backward: memory for ~30% more compute.
    activation_checkpointing: bool = False
    # torch.compile the model before DeepSpeed wraps it.
    compile: bool = False
    # Save every N steps (0: only on demand: signals and the end of the run); keep the newest k
    # complete checkpoints (the newest complete one is never deleted).
    checkpoint_every: int = 1000
    keep_last: int = 3
    # Periodic saves in the background: the step waits only while the state is copied to host
    # memory, then the files are written while training goes on (one save in flight; COMPLETE
    # once every rank's files are on disk). Saves on a stop signal and at the end always wait.
    # null: on with GPUs; off on CPUs, where the writer competes with training for the cores.
    checkpoint_async: bool | None = None
    # "auto": resume from the run directory's latest complete checkpoint if there is one;
    # "never": start fresh (refused if checkpoints exist); or a checkpoint directory to start from.
    resume: str = "auto"
    # Evaluate on data.eval_shards every N steps (0: only at the end).
    eval_every: int = 1000
    # Steps whose loss or gradient is NaN/inf on any rank are skipped by every rank; this many
    # in a row stop the run (exit code 3).
    max_consecutive_nonfinite: int = 5
    # A collective that does not finish in this time fails the job instead of hanging it; the
    # watchdog dumps every thread's stack and exits (code 4) when no step finishes for this long.
    collective_timeout_seconds: float = 1800.0
    watchdog_seconds: float = 3600.0
    # Dense peak FLOP/s of one accelerator for MFU; null looks the device up (vitscale/bench/peaks.py).
    peak_flops: float | None = None

    def validate(self) -> None:
        if self.ds_config and self.kind != "deepspeed":
            raise ConfigError("engine.ds_config", f"a DeepSpeed JSON was given but engine.kind={self.kind}",
                              "drop --ds_config, or use engine.kind=deepspeed")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("engine.zero_stage", f"{self.zero_stage} is not a ZeRO stage", "use 0, 1, 2 or 3")
        require_positive(self, "engine", ("micro_batch_size", "global_batch_size", "keep_last",
                                          "max_consecutive_nonfinite", "collective_timeout_seconds"))
        for name in ("checkpoint_every", "eval_every", "watchdog_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"engine.{name}", "must be >= 0", "use 0 to disable")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("engine.global_batch_size", f"{self.global_batch_size} is not a multiple of "
                              f"engine.micro_batch_size={self.micro_batch_size}",
                              "make it micro-batch x accumulation x world size")
        if not self.resume.strip():
            raise ConfigError("engine.resume", "is empty", "use auto, never, or a checkpoint directory")
