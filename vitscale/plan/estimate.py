"""What a run needs, before it runs: memory per rank, speed, input rate, checkpoints, traffic.

    plan = make_plan(config, Hardware.named("h100"), gpus=64, mfu=0.4)   # a JSON-ready dict

Every number comes from the config tree the trainer reads: shapes from ModelConfig.shape(), FLOPs
from vitscale/model/flops.py (the MFU accounting), ZeRO model states and buffers from
vitscale/engine/ds_config.py (what `vitscale bench zero-memory` measures), bucket sizes from the
same "auto" rules the engine applies, activations from vitscale/plan/activations.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

from vitscale.engine.ds_config import (bucket_allowance_bytes_per_parameter, deepspeed_config, fill_bucket_sizes,
                                       gradient_accumulation_steps, held_buffer_bytes_per_parameter,
                                       model_state_bytes_per_parameter, read_ds_json)
from vitscale.errors import ConfigError
from vitscale.model.flops import tokens_per_image, training_flops_per_image
from vitscale.plan.activations import activation_bytes

GIB = 2 ** 30
GB = 1e9
# Memory as the driver reports it (nvidia-smi's MiB), and the name peaks.py looks up.
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20),
    "h200": ("NVIDIA H200", 143771 * 2 ** 20),
    "a100": ("NVIDIA A100-SXM4-80GB", 81920 * 2 ** 20),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", 40960 * 2 ** 20),
}
# What the allocator cannot hand to tensors: the CUDA context, cuBLAS/cuDNN workspaces, NCCL's
# buffers (a fixed reserve) and the caching allocator's fragmentation (a fraction).
RESERVE_BYTES = 2.5 * GIB
FRAGMENTATION = 0.05
# `vitscale bench data`'s shard pipeline on ~500x375 JPEGs, 224 px crops (README performance table).
DEFAULT_DECODE_IMAGES_PER_CORE = 729.0
DEFAULT_DECODE_SOURCE = "default: README, `vitscale bench data`, ~500x375 JPEGs"
OPTIMIZER_BYTES = {"adamw": 8, "sgd": 4}  # fp32 state per parameter: Adam's two moments, SGD's momentum


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    peak_flops: float | None
    gpus_per_node: int = 8
    link_bytes_per_second: float | None = None   # per-rank bus bandwidth of the collectives
    disk_bytes_per_second: float = 5 * GB         # aggregate checkpoint write bandwidth of the job
    host_copy_bytes_per_second: float = 20 * GB   # device -> pinned host copy (background saves)
    decode_images_per_core: float = DEFAULT_DECODE_IMAGES_PER_CORE
    decode_source: str = DEFAULT_DECODE_SOURCE

    @classmethod
    def named(cls, gpu: str, precision: str = "bf16", *, memory_gib: float | None = None,
              peak_tflops: float | None = None, **settings) -> Hardware:
        from vitscale.bench.peaks import lookup_peak_tflops

        device_name, memory = GPUS.get(gpu.lower(), (gpu, None))
        if memory_gib is not None:
            memory = memory_gib * GIB
        if memory is None:
            raise ConfigError("--gpu", f"unknown GPU {gpu!r} and no --memory-gib",
                              f"use one of {', '.join(GPUS)} or give --memory-gib and --peak-tflops")
        tflops = peak_tflops if peak_tflops is not None else lookup_peak_tflops(device_name, _peak_precision(precision))
        if not tflops:
            raise ConfigError("--gpu", f"no datasheet peak known for {gpu!r} in {precision}",
                              "give --peak-tflops (dense TFLOP/s of one GPU)")
        return cls(name=device_name, memory_bytes=float(memory), peak_flops=tflops * 1e12, **settings)

    def usable_bytes(self) -> float:
        return self.memory_bytes * (1 - FRAGMENTATION) - RESERVE_BYTES


def _peak_precision(precision: str) -> str:
    return "tf32" if precision == "fp32" else precision  # fp32 matmuls run on TF32 tensor cores


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    largest_block: int      # one encoder block: what FSDP2 gathers at a time
    outside_blocks: int     # patch embedding, position embedding, head: FSDP2's root unit
    largest_module: int     # DeepSpeed's "largest layer" (a module's own parameters)
    sizes: list[int]        # every parameter's element count (ZeRO-3 keeps the small ones whole)

    @classmethod
    def of(cls, model_config) -> ParameterCounts:
        import torch

        from vitscale.model.vit import build_model

        with torch.device("meta"):
            model = build_model(model_config)
        sizes = [p.numel() for p in model.parameters()]
        blocks = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
        own = [sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()]
        return cls(total=sum(sizes), largest_block=max(blocks), outside_blocks=sum(sizes) - sum(blocks),
                   largest_module=max(own), sizes=sizes)

    def below(self, threshold: float) -> int:
        return sum(s for s in self.sizes if s < threshold)


@dataclass(frozen=True)
class MemoryRow:
    engine: str               # "deepspeed ZeRO-2", "fsdp2", "local"
    model_states: float       # weights, gradients, optimizer state (and master copy), per rank
    buffers_held: float       # buffers allocated all through the step (ZeRO-1/3's reduce bucket, ...)
    buffers_transient: float  # allocated for a while: other buckets, gathered weights, the step's copies
    activations: float        # the configured micro-batch, the configured checkpointing
    activations_other: float  # the same micro-batch with checkpointing toggled
    largest_micro_batch: int
    largest_micro_batch_other: int

    @property
    def total(self) -> float:
        return self.model_states + self.buffers_held + self.buffers_transient + self.activations


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def optimizer_state_bytes(optim) -> int:
    name = optim.base_optimizer if optim.name in ("sam", "gsam") else optim.name
    if name == "sgd" and optim.momentum == 0:
        return 0
    return OPTIMIZER_BYTES[name]


def sharpness_bytes_per_parameter(optim, weight_bytes: int) -> float:
    """SAM keeps the clean gradient, a copy of the weights and the perturbed gradient (full, in
    the weights' dtype) while it computes its direction; GSAM also the combined update."""
    return {"sam": 3, "gsam": 4}.get(optim.name, 0) * weight_bytes


def gradient_bytes(ds: dict, precision: str) -> int:
    """DeepSpeed accumulates gradients in the model's dtype unless data_types.grad_accum_dtype says
    otherwise."""
    dtype = str(ds.get("data_types", {}).get("grad_accum_dtype") or "").lower()
    return {"fp32": 4, "float32": 4, "float": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}.get(
        dtype, element_bytes(precision))


def deepspeed_memory(stage: int, world: int, counts: ParameterCounts, ds: dict, precision: str,
                     optimizer_bytes: int) -> tuple[float, float, float]:
    """(model states, held buffers, transient buffers) in bytes per rank for DeepSpeed ZeRO-`stage`
    with the filled DeepSpeed JSON `ds`."""
    w, g = element_bytes(precision), gradient_bytes(ds, precision)
    zero = ds.get("zero_optimization", {})
    psi = counts.total
    states = model_state_bytes_per_parameter(stage, world, weight_bytes=w, gradient_bytes=g,
                                             optimizer_bytes=optimizer_bytes) * psi
    allowance = bucket_allowance_bytes_per_parameter(zero, stage, psi, weight_bytes=w, gradient_bytes=g,
                                                     world_size=world) * psi
    held = held_buffer_bytes_per_parameter(zero, stage, psi, gradient_bytes=g) * psi
    if stage == 3:
        # Parameters below stage3_param_persistence_threshold stay whole on every rank.
        held += counts.below(float(zero.get("stage3_param_persistence_threshold", 1e5))) * w * (1 - 1 / world)
    return states, held, max(0.0, allowance - held)


def fsdp2_memory(world: int, counts: ParameterCounts, precision: str, optimizer_bytes: int,
                 accumulation: int) -> tuple[float, float, float]:
    """(model states, held, transient buffers) per rank for FSDP2. Sharded fp32 weights and
    optimizer state, and the gradients: sharded (fp32) without accumulation; with it, unsharded
    for every parameter in fp32 (the reduce dtype) from the first micro-batch to the
    reduce-scatter after the last. Transient: the root unit's gathered weights (kept from forward
    to backward), the current and the prefetched block's, in backward one block's unsharded
    gradients (compute dtype, then fp32 for the reduce-scatter) and, with accumulation, the
    sharded gradients, which the last backward fills before it frees the unsharded ones."""
    w = element_bytes(precision)
    sharded_gradients = 4 * counts.total / world
    gradients = 4 * counts.total if accumulation > 1 else sharded_gradients
    states = (4 + optimizer_bytes) * counts.total / world + gradients
    transient = counts.outside_blocks * w + counts.largest_block * (2 * w + w + 4)
    return states, 0.0, transient + (sharded_gradients if accumulation > 1 else 0.0)


def local_memory(counts: ParameterCounts, precision: str, optimizer_bytes: int) -> tuple[float, float, float]:
    """One process: fp32 weights, gradients and optimizer state; bf16 autocast caches a copy of
    each weight for the step."""
    cast = 2 if precision != "fp32" else 0
    return (4 + 4 + optimizer_bytes) * counts.total, 0.0, cast * counts.total


def largest_micro_batch(model_config, fixed: float, usable: float, a: int, checkpointing: bool) -> int:
    """The largest micro-batch whose activations fit next to `fixed` bytes (linear in the batch)."""
    per_image = activation_bytes(model_config, 1, a, checkpointing)
    extra = activation_bytes(model_config, 2, a, checkpointing) - per_image
    base = per_image - extra
    room = usable - fixed - base
    return max(0, int(room // extra)) if extra > 0 else 0


def communication_bytes(engine: str, stage: int, world: int, psi: int, precision: str, accumulation: int) -> float:
    """Bytes each rank sends per optimizer step (ring collectives: (N-1)/N of the buffer each)."""
    if world == 1 or engine == "local":
        return 0.0
    w = element_bytes(precision)
    g = w  # DeepSpeed reduces gradients in the model's dtype (FSDP2 in fp32: its reduce_dtype)
    per_element = {  # all-reduce = reduce-scatter + all-gather
        ("deepspeed", 0): 2 * g,
        ("deepspeed", 1): g + w,                       # at the boundary; then updated weights gathered
        ("deepspeed", 2): accumulation * g + w,        # every micro-batch's gradients are reduced
        ("deepspeed", 3): accumulation * (2 * w + g),  # weights gathered for forward and backward
        ("fsdp2", 3): accumulation * 2 * w + 4,        # gradients reduce-scattered once, in fp32
    }[(engine, stage if engine == "deepspeed" else 3)]
    return per_element * psi * (world - 1) / world


def checkpoint_bytes(engine: str, psi: int, precision: str, optimizer_bytes: int) -> float:
    """One checkpoint, all ranks: DeepSpeed writes the module's weights (model dtype) plus the fp32
    master copy and optimizer state; FSDP2/local (DCP, torch.save) fp32 weights and optimizer state."""
    weights = element_bytes(precision) + 4 if engine == "deepspeed" else 4
    return (weights + optimizer_bytes) * psi


def make_plan(config, hardware: Hardware, gpus: int, mfu: float, ds_json: dict | None = None) -> dict:
    engine, model = config.engine, config.model
    if gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {gpus}", "give the number of GPUs of the job")
    if engine.kind == "local" and gpus > 1:
        raise ConfigError("engine.kind", f"local runs one process, not {gpus}", "use deepspeed or fsdp2, or --gpus 1")
    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", f"{mfu} is not in (0, 1]", "give a fraction, e.g. 0.4")
    accumulation = gradient_accumulation_steps(engine.global_batch_size, engine.micro_batch_size, gpus)
    counts = ParameterCounts.of(model)
    a = element_bytes(engine.precision)
    optimizer_bytes = optimizer_state_bytes(config.optim)
    sharpness = sharpness_bytes_per_parameter(config.optim, a) * counts.total
    usable = hardware.usable_bytes()
    checkpointing = engine.activation_checkpointing
    act = activation_bytes(model, engine.micro_batch_size, a, checkpointing)
    act_other = activation_bytes(model, engine.micro_batch_size, a, not checkpointing)

    def row(name: str, states: float, held: float, transient: float) -> MemoryRow:
        fixed = states + held + transient + sharpness
        return MemoryRow(name, states, held, transient + sharpness, act, act_other,
                         largest_micro_batch(model, fixed, usable, a, checkpointing),
                         largest_micro_batch(model, fixed, usable, a, not checkpointing))

    rows: list[MemoryRow] = []
    for stage in (0, 1, 2, 3):
        ds = fill_bucket_sizes(deepspeed_config(_with_stage(config, stage), gpus, stage_json(stage, ds_json)),
                               counts.total)
        rows.append(row(f"deepspeed ZeRO-{stage}", *deepspeed_memory(stage, gpus, counts, ds, engine.precision,
                                                                     optimizer_bytes)))
    rows.append(row("fsdp2", *fsdp2_memory(gpus, counts, engine.precision, optimizer_bytes, accumulation)))
    if gpus == 1:
        rows.append(row("local", *local_memory(counts, engine.precision, optimizer_bytes)))
    chosen = {"deepspeed": f"deepspeed ZeRO-{engine.zero_stage}", "fsdp2": "fsdp2", "local": "local"}[engine.kind]

    flops = training_flops_per_image(model)
    tokens = tokens_per_image(model)
    per_gpu = mfu * hardware.peak_flops / flops
    job = per_gpu * gpus
    step_seconds = engine.global_batch_size / job
    per_node = per_gpu * min(gpus, hardware.gpus_per_node)
    link = hardware.link_bytes_per_second or (350 * GB if gpus <= hardware.gpus_per_node else 45 * GB)
    comm = communication_bytes(engine.kind, engine.zero_stage, gpus, counts.total, engine.precision, accumulation)
    ckpt = checkpoint_bytes(engine.kind, counts.total, engine.precision, optimizer_bytes)
    return {
        "model": model.label, "image_size": model.image_size, "tokens_per_image": tokens,
        "parameters": counts.total, "gpus": gpus, "gpu": hardware.name,
        "gpu_memory_gib": hardware.memory_bytes / GIB, "usable_memory_gib": usable / GIB,
        "precision": engine.precision, "engine": chosen, "micro_batch_size": engine.micro_batch_size,
        "global_batch_size": engine.global_batch_size, "gradient_accumulation": accumulation,
        "activation_checkpointing": checkpointing,
        "memory": [{**asdict(r), "total": r.total, "fits": r.total <= usable, "chosen": r.engine == chosen}
                   for r in rows],
        "speed": {"mfu": mfu, "peak_tflops": hardware.peak_flops / 1e12,
                  "training_gflops_per_image": flops / 1e9,
                  "images_per_second_per_gpu": per_gpu, "images_per_second": job,
                  "tokens_per_second": job * tokens, "step_seconds": step_seconds,
                  # The recompute is work MFU does not count: the GPU must run 4/3 as fast.
                  "hardware_utilisation_needed": mfu * (4 / 3 if checkpointing else 1)},
        "data": {"images_per_second_per_node": per_node, "decode_images_per_core": hardware.decode_images_per_core,
                 "decode_source": hardware.decode_source,
                 "cores_per_node": math.ceil(per_node / hardware.decode_images_per_core)},
        "checkpoint": {"bytes": ckpt, "per_rank_bytes": ckpt / gpus,
                       "write_seconds": ckpt / hardware.disk_bytes_per_second,
                       "disk_gb_per_second": hardware.disk_bytes_per_second / GB,
                       "background_blocked_seconds": ckpt / gpus / hardware.host_copy_bytes_per_second},
        "communication": {"bytes_per_rank_per_step": comm, "link_gb_per_second": link / GB,
                          "seconds_per_step": comm / link,
                          "fraction_of_step": comm / link / step_seconds},
    }


def stage_json(stage: int, ds_json: dict | None) -> dict | None:
    """The DeepSpeed JSON a ZeRO-`stage` run would use: the user's if it is that stage, else the
    shipped configs/zeroN.json (none for stage 0)."""
    from importlib import resources
    from pathlib import Path

    if ds_json is not None and ds_json.get("zero_optimization", {}).get("stage") == stage:
        return copy.deepcopy(ds_json)
    if stage == 0:
        return None
    checkout = Path(__file__).resolve().parents[2] / "configs" / f"zero{stage}.json"
    if checkout.is_file():
        return read_ds_json(checkout)
    with resources.as_file(resources.files("vitscale.configs") / f"zero{stage}.json") as path:  # a wheel
        return read_ds_json(path)


def _with_stage(config, stage: int):
    clone = copy.deepcopy(config)
    clone.engine.zero_stage = stage
    return clone
