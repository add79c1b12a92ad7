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
        raise ConfigError("engine.ds_config", f"{path} line {error.lineno} is not valid JSON", "fix the syntax") from None
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
    for key in BUCKET_KEYS if zero["stage"] == 3 else BUCKET_KEYS[:2]:
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


# ZeRO communication buckets: DeepSpeed allocates them whole, so a bucket larger than the model
# only costs memory and time (a 5e8-element fp32 bucket is 2 GB zeroed every step).
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")
MAX_BUCKET_ELEMENTS = 500_000_000


def fill_bucket_sizes(ds: dict[str, Any], num_parameters: int) -> dict[str, Any]:
    """Replace "auto" bucket sizes with min(5e8, the model's parameter count)."""
    zero = ds.get("zero_optimization", {})
    for key in BUCKET_KEYS:
        if zero.get(key) == AUTO:
            zero[key] = int(min(MAX_BUCKET_ELEMENTS, max(num_parameters, 1)))
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
