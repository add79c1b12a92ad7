"""`vitscale bench attention`: TFLOP/s of every available attention backend at ViT shapes.

    vitscale bench attention                      # B/16, L/16, H/14 at 224 and 384 px, fwd and fwd+bwd
    vitscale bench attention --quick              # 224 px only, batch 1, few repeats (CPU smoke run)
    vitscale bench attention --save-choices       # record the winners for model.attention_backend=auto

FLOPs follow the flash-attention convention: forward 4 B H N^2 d (q k^T and p v), backward 2.5x
forward (five matmuls, the recomputation of q k^T not counted), so fwd+bwd = 3.5x forward.
Ratios are against SDPA measured in the same run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from vitscale.bench.timing import format_table, machine_description, median, time_interleaved, write_json
from vitscale.errors import ConfigError
from vitscale.kernels import selection
from vitscale.model.attention import attention
from vitscale.model.config import ModelConfig
from vitscale.model.flops import tokens_per_image

BASELINE = "sdpa"
# ViT-H/14 cannot run at 384 px (not a multiple of 14); 392 (28 x 28 patches) is its neighbour.
VIT_SHAPES = [("B/16", 224), ("L/16", 224), ("H/14", 224), ("B/16", 384), ("L/16", 384), ("H/14", 392)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class AttentionShape:
    model: str
    image_size: int
    batch: int
    heads: int
    tokens: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"{self.model}@{self.image_size}"

    def forward_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.tokens ** 2 * self.head_dim


def vit_attention_shape(model: str, image_size: int, batch: int) -> AttentionShape:
    config = ModelConfig(name=model, image_size=image_size)
    shape = config.shape()
    return AttentionShape(model, image_size, batch, shape.heads, tokens_per_image(config), shape.head_dim)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on GPU, 2 on CPU (1 with --quick)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of math,sdpa,triton,flash (default: all available here)")
    parser.add_argument("--quick", action="store_true", help="224 px shapes only, small batch, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per backend (default 20, quick 3)")
    parser.add_argument("--json", default="runs/bench/attention.json", help="where to write the results")
    parser.add_argument("--save-choices", action="store_true",
                        help=f"merge the winners into the auto-backend choices file (${selection.CHOICES_ENV} or "
                             "~/.cache/vitscale/attention_choices.json)")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda was asked for but no GPU is visible", "use --device cpu")
    return device


def chosen_backends(requested: str | None, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> tuple[list[str], dict[str, str]]:
    """Backends to time and, for each one left out, why."""
    available = selection.available_backends(device)
    wanted = requested.split(",") if requested else ["math", "sdpa", "triton", "flash"]
    unknown = [b for b in wanted if b not in ("math", "sdpa", "triton", "flash")]
    if unknown:
        raise ConfigError("--backends", f"unknown backend(s) {', '.join(unknown)}", "use math, sdpa, triton, flash")
    skipped = {b: ("needs a CUDA GPU" if device.type != "cuda" else "not installed")
               for b in wanted if b not in available}
    if "flash" in wanted and "flash" in available and dtype == torch.float32:
        skipped["flash"] = "flash-attn takes fp16/bf16 only"
        available = [b for b in available if b != "flash"]
    return [b for b in wanted if b in available], skipped


def measure_shape(shape: AttentionShape, backends: list[str], *, device, dtype, repeats: int) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (torch.randn(shape.batch, shape.heads, shape.tokens, shape.head_dim, device=device,
                                     dtype=dtype, generator=generator) for _ in range(4))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward(backend):
        with torch.no_grad():
            return attention(q, k, v, backend=backend)

    def forward_backward(backend):
        for leaf in leaves:
            leaf.grad = None
        attention(*leaves, backend=backend).backward(grad_out)

    fwd = time_interleaved({b: (lambda b=b: forward(b)) for b in backends}, device=device, warmup=2,
                           repeats=repeats)
    fwd_bwd = time_interleaved({b: (lambda b=b: forward_backward(b)) for b in backends}, device=device,
                               warmup=2, repeats=repeats)
    flops = shape.forward_flops()
    return [dict(shape=shape.label, batch=shape.batch, heads=shape.heads, tokens=shape.tokens,
                 head_dim=shape.head_dim, backend=b, fwd_ms=median(fwd[b]) * 1e3, fwd_bwd_ms=median(fwd_bwd[b]) * 1e3,
                 fwd_tflops=flops / median(fwd[b]) / 1e12, fwd_bwd_tflops=3.5 * flops / median(fwd_bwd[b]) / 1e12)
            for b in backends]


def add_ratios(rows: list[dict]) -> None:
    """Speed-up over SDPA of the same shape (time ratio), when SDPA was measured."""
    baseline = {r["shape"]: r for r in rows if r["backend"] == BASELINE}
    for row in rows:
        base = baseline.get(row["shape"])
        row["fwd_vs_sdpa"] = base["fwd_ms"] / row["fwd_ms"] if base else None
        row["fwd_bwd_vs_sdpa"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"] if base else None


def choice_entries(rows: list[dict], device: torch.device, dtype: torch.dtype) -> list[dict]:
    entries: dict[str, dict] = {}
    for row in rows:
        entry = entries.setdefault(row["shape"], dict(
            device=selection.device_label(device), dtype=str(dtype).removeprefix("torch."), heads=row["heads"],
            tokens=row["tokens"], head_dim=row["head_dim"], fwd_ms={}, fwd_bwd_ms={}))
        entry["fwd_ms"][row["backend"]] = row["fwd_ms"]
        entry["fwd_bwd_ms"][row["backend"]] = row["fwd_bwd_ms"]
    return list(entries.values())


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    batch = args.batch_size or (32 if on_gpu else (1 if args.quick else 2))
    repeats = args.repeats or (3 if args.quick else 20)
    backends, skipped = chosen_backends(args.backends, device, dtype)
    shapes = [vit_attention_shape(m, s, batch) for m, s in VIT_SHAPES if not args.quick or s == 224]
    rows = []
    for shape in shapes:
        rows += measure_shape(shape, backends, device=device, dtype=dtype, repeats=repeats)
    add_ratios(rows)
    headers = ["shape", "B x H x N x d", "backend", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
               "fwd+bwd vs sdpa"]
    table = [[r["shape"], f"{r['batch']}x{r['heads']}x{r['tokens']}x{r['head_dim']}", r["backend"], r["fwd_ms"],
              r["fwd_tflops"], r["fwd_bwd_ms"], r["fwd_bwd_tflops"], r["fwd_bwd_vs_sdpa"]] for r in rows]
    machine = machine_description(device)
    print(f"attention on {machine.get('gpu', machine.get('cpu'))}, {str(dtype).removeprefix('torch.')}, "
          f"median of {repeats}")
    print(format_table(headers, table))
    for backend, why in skipped.items():
        print(f"skipped {backend}: {why}")
    payload = dict(benchmark="attention", machine=machine, dtype=str(dtype).removeprefix("torch."),
                   repeats=repeats, flops_convention="fwd 4BHN^2d; fwd+bwd 3.5x fwd", skipped=skipped, rows=rows)
    print(f"wrote {write_json(args.json, payload)}")
    if args.save_choices:
        print(f"auto-backend choices: {selection.save_choices(choice_entries(rows, device, dtype))}")
    return 0
