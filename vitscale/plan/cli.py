"""`vitscale plan`: will this run fit, how fast will it go, and what does it need.

    vitscale plan --config configs/vit_h14_jft.yaml --gpus 64 --gpu h100
    vitscale plan --config configs/vit_b16_i21k.yaml --gpus 8 --gpu h100 --mfu 0.45 --json plan.json
    vitscale plan --config configs/vit_h14_jft.yaml --gpus 64 --gpu h100 engine.activation_checkpointing=true

Per rank and for every engine the config could name: model states, buffers, activations of the
configured micro-batch (with and without activation checkpointing) and the largest micro-batch
that fits; then the step at the given MFU, the input rate the data path must deliver and the CPU
cores that takes, the checkpoint and the bytes each rank sends per step. Nothing runs on a GPU:
the numbers are vitscale/plan/estimate.py's accounting of the same config tree the trainer reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitscale.config import add_config_arguments, load_config
from vitscale.errors import ConfigError

GIB = 2 ** 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (its ZeRO stage and buckets), "
                        "as for train")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job (the world size)")
    parser.add_argument("--gpu", default="h100", help="h100, h200, a100, a100-40gb, or a name peaks.py knows "
                        "(with --memory-gib)")
    parser.add_argument("--memory-gib", type=float, default=None, help="GPU memory (default: the GPU's)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s of one GPU in the run's precision (default: the datasheet's)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to plan for (0.4)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--decode-rate", type=float, default=None,
                        help="images/s one CPU core decodes and augments (default: --data-bench's, else 729)")
    parser.add_argument("--data-bench", default=None,
                        help="JSON of `vitscale bench data --output` to take the decode rate from")
    parser.add_argument("--disk-gbps", type=float, default=5.0,
                        help="aggregate checkpoint write bandwidth of the job, GB/s (5)")
    parser.add_argument("--link-gbps", type=float, default=None,
                        help="per-rank collective bandwidth, GB/s (default 350 in one node, 45 across nodes)")
    parser.add_argument("--json", default=None, help="also write the plan as JSON here")


def run(args: argparse.Namespace) -> int:
    from vitscale.engine.ds_config import read_ds_json, resolve_zero_stage
    from vitscale.plan.estimate import GB, Hardware, make_plan

    overrides = list(args.overrides or [])
    if args.ds_config:
        overrides.append(f"engine.ds_config={args.ds_config}")
    config = load_config(args.config, overrides)
    ds_json = read_ds_json(config.engine.ds_config) if config.engine.ds_config else None
    if ds_json is not None:
        resolve_zero_stage(config, ds_json, any(o.startswith("engine.zero_stage=") for o in args.overrides or []))
    decode_rate, decode_source = decode_rate_of(args)
    hardware = Hardware.named(args.gpu, config.engine.precision, memory_gib=args.memory_gib,
                              peak_tflops=args.peak_tflops, gpus_per_node=args.gpus_per_node,
                              disk_bytes_per_second=args.disk_gbps * GB,
                              link_bytes_per_second=args.link_gbps * GB if args.link_gbps else None,
                              decode_images_per_core=decode_rate, decode_source=decode_source)
    plan = make_plan(config, hardware, args.gpus, args.mfu, ds_json)
    print_plan(plan)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan, indent=1) + "\n")
    return 0


def decode_rate_of(args) -> tuple[float, str]:
    from vitscale.plan.estimate import DEFAULT_DECODE_IMAGES_PER_CORE, DEFAULT_DECODE_SOURCE

    if args.decode_rate is not None:
        if args.decode_rate <= 0:
            raise ConfigError("--decode-rate", "must be positive", "give images/s per core, e.g. 700")
        return args.decode_rate, "--decode-rate"
    if args.data_bench:
        try:
            results = json.loads(Path(args.data_bench).read_text())
            rate = float(next(iter(results["sizes"].values()))["vitscale_images_per_second"])
        except (OSError, ValueError, KeyError, StopIteration, TypeError):
            raise ConfigError("--data-bench", f"{args.data_bench} is not a `vitscale bench data --output` JSON",
                              "run vitscale bench data --output FILE first") from None
        return rate, f"measured: {args.data_bench}"
    return DEFAULT_DECODE_IMAGES_PER_CORE, DEFAULT_DECODE_SOURCE


def print_plan(plan: dict) -> None:
    ac = plan["activation_checkpointing"]
    print(f"vitscale plan: {plan['model']} at {plan['image_size']} px ({plan['parameters'] / 1e6:.1f} M parameters, "
          f"{plan['tokens_per_image']} tokens), {plan['gpus']} x {plan['gpu']} "
          f"({plan['gpu_memory_gib']:.1f} GiB, {plan['usable_memory_gib']:.1f} usable), {plan['precision']}, "
          f"micro-batch {plan['micro_batch_size']} x accumulation {plan['gradient_accumulation']} x {plan['gpus']} "
          f"= {plan['global_batch_size']}")
    other = "without" if ac else "with"
    print(f"memory per rank, GiB (activation checkpointing {'on' if ac else 'off'}; "
          f"'{other} AC': the same micro-batch {other} it)")
    print(f"| engine | model states | buffers | activations | total | fits | largest micro-batch "
          f"| activations {other} AC | largest micro-batch {other} AC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in plan["memory"]:
        mark = " (configured)" if row["chosen"] else ""
        print(f"| {row['engine']}{mark} | {row['model_states'] / GIB:.2f} | "
              f"{(row['buffers_held'] + row['buffers_transient']) / GIB:.2f} | {row['activations'] / GIB:.2f} | "
              f"{row['total'] / GIB:.2f} | {'yes' if row['fits'] else 'NO'} | {row['largest_micro_batch']} | "
              f"{row['activations_other'] / GIB:.2f} | {row['largest_micro_batch_other']} |")
    speed, data, ckpt, comm = plan["speed"], plan["data"], plan["checkpoint"], plan["communication"]
    print(f"speed at MFU {speed['mfu']:.2f} of {speed['peak_tflops']:.0f} TFLOP/s "
          f"({speed['training_gflops_per_image']:.1f} GFLOP per training image): "
          f"{speed['images_per_second_per_gpu']:,.0f} img/s per GPU, "
          f"{speed['images_per_second']:,.0f} img/s, {speed['tokens_per_second']:,.0f} tokens/s, "
          f"step {speed['step_seconds'] * 1e3:.0f} ms"
          + (f"; recompute: the GPUs must run at {speed['hardware_utilisation_needed']:.2f} of peak" if ac else ""))
    print(f"data: {data['images_per_second_per_node']:,.0f} img/s per node = {data['cores_per_node']} cores at "
          f"{data['decode_images_per_core']:.0f} img/s per core [{data['decode_source']}]")
    print(f"checkpoint: {ckpt['bytes'] / 1e9:.1f} GB ({ckpt['per_rank_bytes'] / 1e9:.2f} GB per rank), "
          f"{ckpt['write_seconds']:.1f} s at {ckpt['disk_gb_per_second']:.0f} GB/s; a background save blocks "
          f"~{ckpt['background_blocked_seconds']:.2f} s (host copy)")
    print(f"communication ({plan['engine']}): {comm['bytes_per_rank_per_step'] / 1e9:.2f} GB sent per rank per "
          f"step, {comm['seconds_per_step'] * 1e3:.0f} ms at {comm['link_gb_per_second']:.0f} GB/s = "
          f"{comm['fraction_of_step']:.0%} of the step (to hide behind compute)")
