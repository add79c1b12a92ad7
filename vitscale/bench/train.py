"""`vitscale bench train`: full train steps of vitscale's ViT against timm's VisionTransformer of
the same shape, in the same run, eager and torch.compile.

    vitscale bench train --model B/16 --batch-size 64                 # GPU: images/s, tokens/s, MFU
    vitscale bench train --model Ti/16 --batch-size 8 --modes eager   # this CPU

A step is what each library's training does: forward, cross-entropy, backward, AdamW step.
vitscale's optimizer comes from its engine (`vitscale.engine.optim.build_optimizer`, the one
`vitscale train` uses); timm's from `timm.optim.create_optimizer_v2(model, "adamw")`, the one
timm's train.py uses. Same shape, same dtype (autocast for bf16/fp16 in both), same batch, same
data; forward+backward and the optimizer step are also reported apart, so a difference can be
traced to the model or to the optimizer. Steps of all variants are interleaved (see timing.py).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from vitscale.bench.attention import DTYPES, resolve_device
from vitscale.bench.peaks import peak_flops
from vitscale.bench.timing import (format_table, machine_description, measured_gemm_flops, median, synchronize,
                                   time_once, write_json)
from vitscale.errors import ConfigError
from vitscale.model.config import ModelConfig
from vitscale.model.flops import tokens_per_image, training_flops_per_image
from vitscale.model.vit import build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="B/16", help="ViT size/patch as in model.name (default B/16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 64 GPU, 8 CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--attention-backend", default="auto", help="vitscale's model.attention_backend")
    parser.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    parser.add_argument("--libraries", default="vitscale,timm", help="comma-separated: vitscale, timm")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation happens here)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="device peak FLOP/s for MFU (overrides the table)")
    parser.add_argument("--json", default="runs/bench/train.json", help="where to write the results")


def build_vitscale(config: ModelConfig) -> torch.nn.Module:
    return build_model(config)


def build_timm(config: ModelConfig) -> torch.nn.Module:
    """timm's VisionTransformer with vitscale's shape: pre-LN, [class] token, exact GELU, LN eps 1e-6."""
    from timm.models.vision_transformer import VisionTransformer

    shape = config.shape()
    return VisionTransformer(img_size=config.image_size, patch_size=shape.patch_size, in_chans=config.in_channels,
                             embed_dim=shape.width, depth=shape.depth, num_heads=shape.heads,
                             mlp_ratio=shape.mlp_dim / shape.width, num_classes=config.num_classes,
                             class_token=True, global_pool="token", qkv_bias=True)


def build_vitscale_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    from vitscale.engine.config import OptimConfig
    from vitscale.engine.optim import build_optimizer

    return build_optimizer(OptimConfig(name="adamw", lr=1e-4, weight_decay=0.1), model)


def build_timm_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.1)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    defaults = optimizer.defaults
    kind = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "default"
    return f"{type(optimizer).__name__} ({kind})"


class StepRunner:
    """One library's train step on fixed data; times forward+backward and the optimizer apart."""

    def __init__(self, model, optimizer, images, labels, *, device, dtype, compile_model: bool):
        self.model = torch.compile(model) if compile_model else model
        self.optimizer, self.images, self.labels, self.device = optimizer, images, labels, device
        self.autocast = dtype != torch.float32
        self.dtype = dtype
        self.forward_backward_seconds: list[float] = []
        self.optimizer_seconds: list[float] = []

    def _forward_backward(self) -> None:
        context = torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        with context:
            loss = F.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self, record: bool = True) -> None:
        fwd_bwd = time_once(self._forward_backward, self.device)
        opt = time_once(self.optimizer.step, self.device)
        if record:
            self.forward_backward_seconds.append(fwd_bwd)
            self.optimizer_seconds.append(opt)

    def result(self, batch: int, tokens: int, flops_per_image: float, peak: float | None) -> dict:
        step_seconds = [a + b for a, b in zip(self.forward_backward_seconds, self.optimizer_seconds)]
        seconds = median(step_seconds)
        images_per_second = batch / seconds
        return dict(step_ms=seconds * 1e3, best_step_ms=min(step_seconds) * 1e3,
                    forward_backward_ms=median(self.forward_backward_seconds) * 1e3,
                    optimizer_ms=median(self.optimizer_seconds) * 1e3, images_per_second=images_per_second,
                    tokens_per_second=images_per_second * tokens,
                    mfu=flops_per_image * images_per_second / peak if peak else None,
                    optimizer=optimizer_kind(self.optimizer))


LIBRARIES: dict[str, tuple[Callable, Callable]] = {
    "vitscale": (build_vitscale, build_vitscale_optimizer),
    "timm": (build_timm, build_timm_optimizer),
}


def parse_list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ConfigError(flag, f"got {value!r}", f"use a comma-separated subset of {', '.join(allowed)}")
    return items


def build_runners(args, config: ModelConfig, device, dtype) -> dict[tuple[str, str], StepRunner]:
    libraries = parse_list(args.libraries, tuple(LIBRARIES), "--libraries")
    modes = parse_list(args.modes, ("eager", "compile"), "--modes")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, config.in_channels, config.image_size, config.image_size,
                         generator=generator).to(device)
    labels = torch.randint(0, max(config.num_classes, 1), (args.batch_size,), generator=generator).to(device)
    runners = {}
    for mode in modes:
        for library in libraries:
            build, build_optimizer = LIBRARIES[library]
            torch.manual_seed(0)
            model = build(config).to(device)
            runners[(library, mode)] = StepRunner(model, build_optimizer(model), images, labels, device=device,
                                                  dtype=dtype, compile_model=mode == "compile")
    return runners


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise ConfigError("--steps/--warmup/--batch-size", "must be positive", "e.g. --steps 10 --warmup 2")
    config = ModelConfig(name=args.model, image_size=args.image_size, num_classes=args.num_classes,
                         attention_backend=args.attention_backend)
    config.validate()
    runners = build_runners(args, config, device, dtype)
    counts = {library: sum(p.numel() for p in runner.model.parameters()) for (library, _), runner in runners.items()}
    assert len(set(counts.values())) == 1, f"models differ in size: {counts}"  # same shape, by construction
    for runner in runners.values():  # warm-up (and compile) each before timing any
        for _ in range(args.warmup):
            runner.step(record=False)
    order = list(runners.values())
    for step in range(args.steps):  # interleaved, A B B A: every variant sees the same machine load
        for runner in (order if step % 2 == 0 else order[::-1]):
            runner.step()
    synchronize(device)
    peak = peak_flops(device, "fp32" if dtype == torch.float32 else str(dtype).removeprefix("torch."),
                      args.peak_flops)
    tokens, flops = tokens_per_image(config), training_flops_per_image(config)
    gemm_n, gemm_flops = measured_gemm_flops(device, dtype)
    rows = [dict(library=library, mode=mode, **runner.result(args.batch_size, tokens, flops, peak))
            for (library, mode), runner in runners.items()]
    for row in rows:  # the step's achieved rate against what a plain GEMM reaches here: the roofline
        row["achieved_tflops"] = flops * row["images_per_second"] / 1e12
        row["of_measured_gemm"] = flops * row["images_per_second"] / gemm_flops
    args.measured_gemm = {"n": gemm_n, "tflops": gemm_flops / 1e12}
    for row in rows:
        timm = next((r for r in rows if r["library"] == "timm" and r["mode"] == row["mode"]), None)
        row["speedup_vs_timm"] = row["images_per_second"] / timm["images_per_second"] if timm else None
        # The fastest step is the least disturbed by other load on a shared machine.
        row["best_speedup_vs_timm"] = timm["best_step_ms"] / row["best_step_ms"] if timm else None
    report(args, config, device, dtype, rows, peak, counts)
    return 0


def report(args, config, device, dtype, rows, peak, counts) -> None:
    machine = machine_description(device)
    print(f"train step of {config.name} at {config.image_size}px, batch {args.batch_size}, "
          f"{str(dtype).removeprefix('torch.')}, on {machine.get('gpu', machine.get('cpu'))}; "
          f"median of {args.steps} interleaved steps; {next(iter(counts.values())) / 1e6:.1f}M parameters")
    headers = ["library", "mode", "step ms", "best ms", "fwd+bwd ms", "optim ms", "images/s", "tokens/s", "MFU",
               "TFLOP/s", "of GEMM", "vs timm", "vs timm (best)", "optimizer"]
    ratio = lambda value: f"{value:.2f}x" if value is not None else None  # noqa: E731
    table = [[r["library"], r["mode"], r["step_ms"], r["best_step_ms"], r["forward_backward_ms"], r["optimizer_ms"],
              r["images_per_second"], r["tokens_per_second"],
              f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else None,
              f"{r['achieved_tflops']:.3g}", f"{100 * r['of_measured_gemm']:.1f}%",
              ratio(r["speedup_vs_timm"]), ratio(r["best_speedup_vs_timm"]), r["optimizer"]]
             for r in rows]
    print(format_table(headers, table))
    gemm = args.measured_gemm
    print(f"of GEMM: achieved FLOP/s over a {gemm['n']}^3 {str(dtype).removeprefix('torch.')} matrix product "
          f"measured in this run ({gemm['tflops']:.3g} TFLOP/s), the limit on this device")
    if peak is None:
        print("MFU: no known peak for this device (pass --peak-flops)")
    payload = dict(benchmark="train", machine=machine, model=config.name, image_size=config.image_size,
                   batch_size=args.batch_size, dtype=str(dtype).removeprefix("torch."),
                   attention_backend=args.attention_backend, steps=args.steps, warmup=args.warmup,
                   parameters=next(iter(counts.values())), peak_flops=peak,
                   training_flops_per_image=training_flops_per_image(config), measured_gemm=args.measured_gemm,
                   rows=rows)
    print(f"wrote {write_json(args.json, payload)}")
