"""The DeepSpeed JSON, derived from the config tree so the two never disagree.

    ds = deepspeed_config(config, world_size=8)      # dict for deepspeed.initialize(config=...)

Every value the tree knows (batch sizes, accumulation, clipping, precision) may be written "auto"
in the JSON and is filled from the tree; an explicit value must agree with the tree, else a
ConfigError names both. The ZeRO stage is the JSON file's identity (configs/zero3.json is
stage 3): it is copied into `engine.zero_stage` unless the tree set a different one explicitly.
The optimizer and schedule always come from the tree (`optim`, `schedule`), never the JSON.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from vitscale.errors import ConfigError

AUTO = "auto"
# Sections whose content the engine builds itself from the config tree.
TREE_OWNED_SECTIONS = ("optimizer", "scheduler")


def read_ds_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("engine.ds_config", f"file {path} not found", "pass one of configs/zero*.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError("engine.ds_config", f"{path} line {error.lineno} is not valid JSON",
                          "fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("engine.ds_config", f"{path} must hold a JSON object", "see configs/zero2.json")
    return data


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """global = micro x accumulation x world; a ConfigError when no whole accumulation exists."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError("engine.global_batch_size",
                          f"{global_batch} is not divisible by micro-batch {micro_batch} x world size "
                          f"{world_size} = {per_step}",
                          f"use a multiple of {per_step} (e.g. {max(1, round(global_batch / per_step)) * per_step}) "
                          "or change engine.micro_batch_size")
    return global_batch // per_step


def resolve_zero_stage(config: Any, ds_json: dict[str, Any], stage_set_explicitly: bool) -> None:
    """Copy the JSON's explicit stage into the tree (or the tree's into an "auto" JSON stage)."""
    zero = ds_json.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("engine.ds_config", "zero_optimization must be an object", "see configs/zero2.json")
    stage = zero.get("stage", AUTO)
    if stage == AUTO:
        return
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError("engine.ds_config", f"zero_optimization.stage {stage!r} is not a ZeRO stage",
                          "use 0, 1, 2 or 3 (configs/zero1.json, zero2.json, zero3.json)")
    if stage_set_explicitly and stage != config.engine.zero_stage:
        raise ConfigError("engine.zero_stage", f"{config.engine.zero_stage} disagrees with stage {stage} "
                          "in the DeepSpeed JSON", "drop the override or pick the matching configs/zeroN.json")
    config.engine.zero_stage = stage


def deepspeed_config(config: Any, world_size: int, ds_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON for deepspeed.initialize: `ds_json` (or a minimal one) with every "auto" filled
    and every explicit tree-owned value checked against `config` (a validated Config)."""
    engine = config.engine
    ds = copy.deepcopy(ds_json) if ds_json is not None else {}
    for key in [key for key in ds if key.startswith("//")]:
        del ds[key]  # comment entries (JSON has no comments): the command that uses the file
    for section in TREE_OWNED_SECTIONS:
        if section in ds:
            raise ConfigError("engine.ds_config", f"the DeepSpeed JSON has an {section!r} section",
                              f"remove it: the {'optim' if section == 'optimizer' else 'schedule'} "
                              "section of the config tree defines it")
    accumulation = gradient_accumulation_steps(engine.global_batch_size, engine.micro_batch_size, world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", engine.micro_batch_size, "engine.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", accumulation,
          "engine.global_batch_size / (engine.micro_batch_size x world size)")
    _fill(ds, "train_batch_size", engine.global_batch_size, "engine.global_batch_size")
    _fill(ds, "gradient_clipping", float(config.optim.grad_clip), "optim.grad_clip")

    zero = ds.setdefault("zero_optimization", {})
    # The stage is then engine.zero_stage's (validated 0-3): _fill only keeps a value equal to it.
    _fill(zero, "stage", engine.zero_stage, "engine.zero_stage", where="zero_optimization.")
    for key in BUCKET_KEYS + LIVE_KEYS if zero["stage"] == 3 else BUCKET_KEYS[:2]:
        zero.setdefault(key, AUTO)  # sized from the model by fill_bucket_sizes
    for precision in ("bf16", "fp16"):
        section = ds.setdefault(precision, {})
        _fill(section, "enabled", engine.precision == precision, f"engine.precision == {precision}",
              where=f"{precision}.")
    if "offload_optimizer" in zero or "offload_param" in zero:
        # Our optimizers are torch's AdamW/SGD (per-parameter weight-decay groups, a skip guard);
        # DeepSpeed would otherwise insist on its own CPU Adam for offloading.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**12)  # the engine prints its own progress lines
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# ZeRO communication buckets. DeepSpeed allocates them whole (ZeRO-2 with overlap_comm keeps two
# reduce buffers), so "auto" sizes them to 1/64 of the model: a few per cent of the model-state
# memory, yet messages of 16 MB and more (DDP's default bucket is 25 MB). Never below 2^22
# elements (small models: fewer, larger messages), never above the model or DeepSpeed's 5e8.
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")
# ZeRO-3 keeps up to this many gathered parameters alive (DeepSpeed's default 1e9 keeps a model
# below a billion parameters gathered from forward to backward, undoing the weight partitioning);
# "auto": 1/16 of the model (ViT-H/14: two encoder blocks), at least 2^22.
LIVE_KEYS = ("stage3_max_live_parameters", "stage3_max_reuse_distance")
LIVE_FRACTION = 16
MAX_BUCKET_ELEMENTS = 500_000_000
MIN_BUCKET_ELEMENTS = 1 << 22
BUCKET_FRACTION = 64


def auto_bucket_elements(num_parameters: int) -> int:
    return int(min(MAX_BUCKET_ELEMENTS, max(num_parameters, 1),
                   max(MIN_BUCKET_ELEMENTS, -(-num_parameters // BUCKET_FRACTION))))


def auto_live_parameters(num_parameters: int) -> int:
    return int(min(1e9, max(num_parameters, 1), max(MIN_BUCKET_ELEMENTS, -(-num_parameters // LIVE_FRACTION))))


def fill_bucket_sizes(ds: dict[str, Any], num_parameters: int) -> dict[str, Any]:
    """Replace "auto" bucket sizes and ZeRO-3 live-parameter limits with their sizes for a model
    of `num_parameters` (auto_bucket_elements, auto_live_parameters)."""
    zero = ds.get("zero_optimization", {})
    for key in BUCKET_KEYS:
        if zero.get(key) == AUTO:
            zero[key] = auto_bucket_elements(num_parameters)
    for key in LIVE_KEYS:
        if zero.get(key) == AUTO:
            zero[key] = auto_live_parameters(num_parameters)
    return ds


def _fill(section: dict[str, Any], key: str, value: Any, tree_key: str, where: str = "") -> None:
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
        return
    try:
        same = abs(float(current) - float(value)) < 1e-12 if isinstance(value, float) else current == value
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ConfigError("engine.ds_config", f"{where}{key}={current!r} in the DeepSpeed JSON disagrees with "
                          f"{tree_key}={value!r} from the config tree",
                          f'write "auto" in the JSON or set the tree value to {current!r}')


# ---------------------------------------------------------------------------------------------
# Memory: what ZeRO keeps per rank (also the planner's formula).


def held_buffer_bytes_per_parameter(zero: dict[str, Any], stage: int, num_parameters: int, *,
                                    gradient_bytes: int = 4) -> float:
    """The part of the allowance that stays allocated through forward and backward (measured by
    `vitscale bench zero-memory` between two micro-batches): ZeRO-1 and ZeRO-3 keep one reduce
    bucket of gradients; ZeRO-0 and ZeRO-2 free theirs between uses."""
    if stage not in (1, 3):
        return 0.0
    reduce_bucket = zero.get("reduce_bucket_size", MAX_BUCKET_ELEMENTS)
    reduce_bucket = MAX_BUCKET_ELEMENTS if reduce_bucket == AUTO else float(reduce_bucket)
    return min(reduce_bucket, max(num_parameters, 1)) * gradient_bytes / max(num_parameters, 1)


def model_state_bytes_per_parameter(stage: int, world_size: int, *, weight_bytes: int, gradient_bytes: int,
                                    optimizer_bytes: int = 8) -> float:
    """Bytes per parameter per rank of weights, gradients and optimizer state under ZeRO-`stage`
    (ZeRO paper, section 3): P + G + K, each over its partition. K is the optimizer's state
    (AdamW: two fp32 moments, 8) plus DeepSpeed's fp32 master copy (4), which ZeRO-1/2/3 keep
    even when the model itself is fp32; ZeRO-0 steps the module's own weights when they are fp32."""
    master = 0 if stage == 0 and weight_bytes == 4 else 4
    p, g, k = weight_bytes, gradient_bytes, optimizer_bytes + master
    n = max(world_size, 1)
    return {0: p + g + k, 1: p + g + k / n, 2: p + (g + k) / n, 3: (p + g + k) / n}[stage]


def bucket_allowance_bytes_per_parameter(zero: dict[str, Any], stage: int, num_parameters: int, *,
                                         weight_bytes: int = 4, gradient_bytes: int = 4,
                                         world_size: int = 2, master_gradient_bytes: int = 4) -> float:
    """What DeepSpeed holds beyond model_state_bytes_per_parameter, per parameter per rank:
    ZeRO-0 all-reduces the gradients flattened into buckets of a fixed 5e8 elements (G for a
    model below that); ZeRO-1/2 keep 1 reduce buffer (2 with overlap_comm) of reduce_bucket_size gradients and,
    while stepping, the flattened fp32 copy of their gradient partition (4/N); ZeRO-3 keeps a reduce
    buffer and, while reducing, up to two more of its size (measured: 3 x reduce_bucket_size x G),
    a prefetch bucket of gathered weights, and up to stage3_max_live_parameters gathered weights
    (P (1 - 1/N) each: the rest of a weight is another rank's partition)."""
    psi = max(num_parameters, 1)
    n = max(world_size, 1)

    def elements(key: str, default: float) -> float:
        value = zero.get(key, default)
        return float(default if value == AUTO else value)

    reduce_bucket = min(elements("reduce_bucket_size", MAX_BUCKET_ELEMENTS), psi)
    if stage in (1, 2):
        buffers = 2 if zero.get("overlap_comm", stage == 2) else 1
        return (buffers * reduce_bucket * gradient_bytes) / psi + master_gradient_bytes / n
    if stage == 3:
        prefetch = min(elements("stage3_prefetch_bucket_size", 5e7), psi)
        live = min(elements("stage3_max_live_parameters", 1e9), psi)
        buffers = 3 * reduce_bucket * gradient_bytes + prefetch * weight_bytes
        return buffers / psi + live * weight_bytes * (1 - 1 / n) / psi
    return min(MAX_BUCKET_ELEMENTS, psi) * gradient_bytes / psi
