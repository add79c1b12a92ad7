"""`vitscale bench device` (scripts/device_check.sh): one prepared check of a GPU machine.

    scripts/device_check.sh OUT_DIR              # on a CUDA machine: at most ~8 minutes
    scripts/device_check.sh --dry-run OUT_DIR    # every stage at tiny shapes on the CPU (a test runs it)

Stages, each in its own process with its own time limit, so a hang or a crash in one is reported
and the others still run; each writes OUT_DIR/STAGE.json, and the whole check device_check.json
and device_check.md (the table for the README):

  environment      GPU, driver, torch / triton / CUDA; measured bf16 GEMM TFLOP/s (8192^3) and
                   device-to-device copy GB/s: the ceilings for MFU and the attention table
  kernel           Triton attention vs an fp64 reference, out / dq / dk / dv, bf16 and fp16, at
                   ViT shapes, N=1 and q/k/v split from one qkv tensor; outputs poisoned with NaN,
                   fresh inputs, checked on the autotuning call and again after it
  attention        fwd and fwd+bwd TFLOP/s: triton vs each SDPA backend (flash, cuDNN,
                   efficient, math) and flash-attn when installed, with the chosen tile configs
  train_local      full bf16 train steps through the local engine (backward, fused step): B/16 and
                   H/14, eager vs torch.compile, triton vs sdpa; img/s, tokens/s, MFU against the
                   datasheet peak and the measured GEMM rate, peak memory, host syncs per step
  train_deepspeed  the same through DeepSpeed ZeRO-2 on one rank over NCCL
  train_job        vitscale/train.py under torchrun on shards written here: 30 steps, a
                   checkpoint, a resume, the Prometheus endpoint scraped during the run

On the CPU (`--dry-run`): the Triton interpreter, gloo, fp32, tiny models; the numbers mean
nothing, the code paths are the GPU's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
STAGES = ("environment", "kernel", "attention", "train_local", "train_deepspeed", "train_job")
# Seconds per stage on a GPU (7.7 min in all, start-up included); the dry run gets its own.
# Triton compiles ~19 tile configs per (head dim, dtype) on first use: the kernel stage pays that
# once (the on-disk cache serves the later stages). A stage cut by its limit keeps the rows it
# had finished (STAGE.partial.json).
STAGE_SECONDS = {"environment": 25, "kernel": 150, "attention": 60, "train_local": 100, "train_deepspeed": 55,
                 "train_job": 90}
DRY_STAGE_SECONDS = {"environment": 60, "kernel": 120, "attention": 90, "train_local": 180, "train_deepspeed": 120,
                     "train_job": 240}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/device_check", help="folder for STAGE.json, device_check.json/.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the code paths")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # one stage, in its own process


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        context = Context(out, args.dry_run)
        result = STAGE_FUNCTIONS[args.stage](context)
        (out / f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"vitscale bench device: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"dry_run": args.dry_run, "stages": {}}
    for stage in stages:
        report["stages"][stage] = run_stage(stage, out, args.dry_run)
        print(f"vitscale bench device: {stage}: {report['stages'][stage]['status']} "
              f"in {report['stages'][stage]['seconds']:.0f} s", flush=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    markdown = render_markdown(report)
    (out / "device_check.md").write_text(markdown)
    print(markdown)
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


def run_stage(stage: str, out: Path, dry_run: bool) -> dict[str, Any]:
    limit = (DRY_STAGE_SECONDS if dry_run else STAGE_SECONDS)[stage]
    command = [sys.executable, "-m", "vitscale.bench.device", "--stage", stage, "--out", str(out)]
    command += ["--dry-run"] if dry_run else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env.update(DS_ACCELERATOR="cpu", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    (out / f"{stage}.json").unlink(missing_ok=True)
    (out / f"{stage}.partial.json").unlink(missing_ok=True)
    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit, cwd=REPO)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stderr or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        timed_out = {"status": f"timeout after {limit} s", "seconds": time.monotonic() - started, "log": tail[-3000:]}
        partial = out / f"{stage}.partial.json"
        if partial.is_file():
            timed_out["result"] = json.loads(partial.read_text())
        return timed_out
    seconds = time.monotonic() - started
    (out / f"{stage}.log").write_text(done.stdout + done.stderr)
    result_file = out / f"{stage}.json"
    if done.returncode or not result_file.is_file():
        return {"status": f"failed (exit {done.returncode})", "seconds": seconds, "log": done.stderr[-3000:]}
    return {"status": "ok", "seconds": seconds, "result": json.loads(result_file.read_text())}


# ---------------------------------------------------------------------------------------------
# Shared by the stages.


class Context:
    def __init__(self, out: Path, dry_run: bool):
        import torch

        self.out, self.dry_run = out, dry_run
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def partial(self, stage: str, result: dict[str, Any]) -> None:
        """What the stage has so far, kept if its time runs out."""
        (self.out / f"{stage}.partial.json").write_text(json.dumps(result, indent=1, default=str))

    def environment(self) -> dict[str, Any]:
        path = self.out / "environment.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed(context: Context, fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        context.synchronize()
        started = time.perf_counter()
        fn()
        context.synchronize()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[len(samples) // 2]


# ---------------------------------------------------------------------------------------------
# 1. Environment and ceilings.


def stage_environment(context: Context) -> dict[str, Any]:
    import torch

    from vitscale.bench.peaks import lookup_peak_tflops

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": context.device.type}
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    if context.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        properties = torch.cuda.get_device_properties(0)
        info["multiprocessors"], info["memory_gib"] = properties.multi_processor_count, properties.total_memory / 2**30
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        info["datasheet_bf16_tflops"] = lookup_peak_tflops(info["gpu"], "bf16")
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    n = 256 if context.dry_run else 8192
    a = torch.randn(n, n, device=context.device, dtype=context.dtype)
    b = torch.randn(n, n, device=context.device, dtype=context.dtype)
    seconds = timed(context, lambda: a @ b, warmup=2 if context.dry_run else 3, repeats=3 if context.dry_run else 10)
    info["gemm"] = {"n": n, "dtype": str(context.dtype).replace("torch.", ""), "tflops": 2 * n**3 / seconds / 1e12}
    elements = (16 << 20) if context.dry_run else (1 << 30)  # 2 GiB of bf16 on the GPU
    source = torch.empty(elements, device=context.device, dtype=context.dtype).normal_()
    target = torch.empty_like(source)
    seconds = timed(context, lambda: target.copy_(source), warmup=2, repeats=3 if context.dry_run else 10)
    info["copy"] = {"bytes": source.numel() * source.element_size(),
                    "gb_per_s": 2 * source.numel() * source.element_size() / seconds / 1e9}  # read + write
    return info


# ---------------------------------------------------------------------------------------------
# 2. The kernel against fp64.

# (label, heads, tokens, head_dim): ViT-B/16 and L/16 at 224, L/16 at 384, H/14 at 224 and 392.
KERNEL_SHAPES = [("B/16@224", 12, 197, 64), ("L/16@224", 16, 197, 64), ("L/16@384", 16, 577, 64),
                 ("H/14@224", 16, 257, 80), ("H/14@392", 16, 785, 80), ("N=1", 12, 1, 64)]
DRY_KERNEL_SHAPES = [("tiny", 2, 17, 64), ("tiny d=80", 2, 9, 80), ("N=1", 2, 1, 64)]
TOLERANCE = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 3e-2}  # atol = rtol, as the tests use


def stage_kernel(context: Context) -> dict[str, Any]:
    import torch

    from vitscale.kernels import triton_attention as fa

    shapes = DRY_KERNEL_SHAPES if context.dry_run else KERNEL_SHAPES
    dtypes = [torch.float32, torch.float16] if context.dry_run else [torch.bfloat16, torch.float16]
    batch = 1 if context.dry_run else 4
    rows = []
    for dtype in dtypes:
        for seed, (label, heads, tokens, head_dim) in enumerate(shapes):
            for call in ("autotuning call", "after autotuning"):
                rows.append(check_kernel(fa, context, label, call, batch, heads, tokens, head_dim, dtype,
                                         seed=seed * 2 + (call != "autotuning call")))
            context.partial("kernel", {"rows": rows, "passed": all(row["ok"] for row in rows)})
        label, heads, tokens, head_dim = shapes[0]
        rows.append(check_split_qkv(fa, context, label, batch, heads, tokens, head_dim, dtype))
    return {"rows": rows, "passed": all(row["ok"] for row in rows)}


def _errors(got: dict, want: dict, dtype_name: str) -> tuple[dict[str, float], bool]:
    tolerance = TOLERANCE[dtype_name]
    errors, ok = {}, True
    for name, value in got.items():
        value64 = value.double()
        errors[name] = float((value64 - want[name]).abs().max())
        ok &= bool(not value64.isnan().any() and ((value64 - want[name]).abs() <= tolerance + tolerance *
                                                   want[name].abs()).all())
    return errors, ok


def _reference(q, k, v, grad_out, scale):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = (q64 @ k64.transpose(-1, -2) * scale).softmax(-1) @ v64
    out.backward(grad_out.double())
    return {"out": out.detach(), "dq": q64.grad, "dk": k64.grad, "dv": v64.grad}


def check_kernel(fa, context, label, call, batch, heads, tokens, head_dim, dtype, *, seed) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(batch, heads, tokens, head_dim, generator=generator).to(context.device, dtype)
                         for _ in range(4))
    scale = head_dim ** -0.5
    poison = lambda t, d=None: torch.full(t.shape, float("nan"), dtype=d or t.dtype, device=t.device)  # noqa: E731
    out, lse = fa.attention_forward(q, k, v, scale, out=poison(q), lse=poison(q[..., 0], torch.float32))
    dq, dk, dv = fa.attention_backward(q, k, v, out, lse, grad_out, scale, dq=poison(q), dk=poison(k), dv=poison(v))
    context.synchronize()
    name = str(dtype).replace("torch.", "")
    errors, ok = _errors({"out": out, "dq": dq, "dk": dk, "dv": dv}, _reference(q, k, v, grad_out, scale), name)
    return {"shape": label, "call": call, "dtype": name, "batch": batch, "heads": heads, "tokens": tokens,
            "head_dim": head_dim, "max_abs_error": errors, "tolerance": TOLERANCE[name], "ok": ok}


def check_split_qkv(fa, context, label, batch, heads, tokens, head_dim, dtype) -> dict[str, Any]:
    """q, k, v as strided views of one (B, N, 3, H, d) tensor, as a fused qkv projection makes them."""
    import torch

    generator = torch.Generator().manual_seed(99)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(context.device, dtype)
    qkv.requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    grad_out = torch.randn(batch, heads, tokens, head_dim, generator=generator).to(context.device, dtype)
    out = fa.flash_attention(q, k, v)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    want = _reference(q, k, v, grad_out, head_dim ** -0.5)
    got = {"out": out.detach(), "dq": dqkv[:, :, 0].transpose(1, 2), "dk": dqkv[:, :, 1].transpose(1, 2),
           "dv": dqkv[:, :, 2].transpose(1, 2)}
    name = str(dtype).replace("torch.", "")
    errors, ok = _errors(got, want, name)
    return {"shape": f"{label}, q/k/v split from qkv", "call": "autograd", "dtype": name, "batch": batch,
            "heads": heads, "tokens": tokens, "head_dim": head_dim, "max_abs_error": errors,
            "tolerance": TOLERANCE[name], "ok": ok}


# ---------------------------------------------------------------------------------------------
# 3. Attention speed.

ATTENTION_SHAPES = [("B/16@224", 12, 197, 64, 64), ("L/16@224", 16, 197, 64, 64), ("L/16@384", 16, 577, 64, 16),
                    ("H/14@224", 16, 257, 80, 64), ("H/14@392", 16, 785, 80, 16)]
DRY_ATTENTION_SHAPES = [("tiny", 2, 17, 64, 1)]


def attention_backends(context: Context) -> dict[str, Callable]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitscale.kernels.triton_attention import flash_attention

    def sdpa(backend):
        def call(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return call

    backends = {"triton": flash_attention, "sdpa-math": sdpa(SDPBackend.MATH)}
    if context.device.type == "cuda":
        backends.update({"sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-efficient":
                         sdpa(SDPBackend.EFFICIENT_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)})
        with contextlib.suppress(ImportError):
            from flash_attn import flash_attn_func

            backends["flash-attn"] = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                     v.transpose(1, 2)).transpose(1, 2)
    return backends


def stage_attention(context: Context) -> dict[str, Any]:
    import torch

    from vitscale.kernels import triton_attention as fa

    rows = []
    repeats, warmup = (2, 1) if context.dry_run else (10, 3)
    for label, heads, tokens, head_dim, batch in DRY_ATTENTION_SHAPES if context.dry_run else ATTENTION_SHAPES:
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=context.device, dtype=context.dtype,
                               requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        forward_flops = 4.0 * batch * heads * tokens**2 * head_dim
        for name, attend in attention_backends(context).items():
            row: dict[str, Any] = {"shape": label, "backend": name, "batch": batch}
            try:
                with torch.no_grad():
                    seconds = timed(context, lambda: attend(q, k, v), warmup=warmup, repeats=repeats)
                row["fwd_tflops"] = forward_flops / seconds / 1e12
                seconds = timed(context, lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), grad),
                                warmup=warmup, repeats=repeats)
                row["fwd_bwd_tflops"] = 3.5 * forward_flops / seconds / 1e12
            except (RuntimeError, ValueError) as error:  # a backend that does not take this shape/dtype
                row["error"] = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            rows.append(row)
            context.partial("attention", {"dtype": str(context.dtype).replace("torch.", ""), "rows": rows})
        if not context.dry_run:
            rows[-1]["tiles"] = {kernel: str(getattr(getattr(fa, kernel), "best_config", None))
                                 for kernel in ("_attn_fwd_tuned", "_attn_bwd_dkdv_tuned", "_attn_bwd_dq_tuned")}
    return {"dtype": str(context.dtype).replace("torch.", ""), "rows": rows}


# ---------------------------------------------------------------------------------------------
# 4. Train steps through the engines.

# (model, image size, batch per step on one GPU, variants (attention backend, compile))
# Eager first: a stage cut by its limit loses the compiled variants (the slowest to start) first.
TRAIN_MODELS = [("B/16", 224, 256, [("sdpa", False), ("triton", False)]),
                ("H/14", 224, 64, [("sdpa", False), ("triton", False)]),
                ("B/16", 224, 256, [("sdpa", True), ("triton", True)])]
DRY_TRAIN_MODELS = [("Ti/16", 32, 2, [("sdpa", False), ("triton", False)])]  # compile: tests/test_kernel_training.py
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


def engine_overrides(context: Context, model: str, image_size: int, batch: int, backend: str, compiled: bool,
                     kind: str) -> list[str]:
    overrides = [f"model.name={model}", f"model.image_size={image_size}", "model.num_classes=1000",
                 f"model.attention_backend={backend}", f"engine.kind={kind}", f"engine.compile={str(compiled).lower()}",
                 f"engine.precision={'bf16' if context.device.type == 'cuda' else 'fp32'}",
                 f"engine.micro_batch_size={batch}", f"engine.global_batch_size={batch}",
                 "engine.collective_timeout_seconds=300"]
    if context.dry_run:
        overrides += ["model.depth=1", "model.representation_size=null"]
    return overrides


def measure_train_step(context: Context, kind: str, model: str, image_size: int, batch: int, backend: str,
                       compiled: bool) -> dict[str, Any]:
    import torch

    from vitscale.config import load_config
    from vitscale.engine import Launch, build_engine, start_process_group
    from vitscale.engine.ds_config import deepspeed_config, read_ds_json
    from vitscale.model.flops import tokens_per_image, training_flops_per_image
    from vitscale.objectives import build_objective
    from vitscale.train import build_model

    config = load_config(None, engine_overrides(context, model, image_size, batch, backend, compiled, kind))
    comm = start_process_group(config, Launch.from_environment()) if not hasattr(context, "comm") else context.comm
    context.comm = comm
    ds = deepspeed_config(config, 1, read_ds_json(REPO / "configs" / "zero2.json")) if kind == "deepspeed" else None
    objective = build_objective(config)
    engine = build_engine(config, build_model(config, objective), comm, ds_config=ds)
    images = torch.randn(batch, 3, image_size, image_size, device=comm.device).to(engine.input_dtype)
    targets = torch.randint(0, 1000, (batch,), device=comm.device)
    weights = torch.full((batch,), 1.0 / batch, device=comm.device)
    no_skip = torch.zeros((), dtype=torch.bool, device=comm.device)

    def step() -> None:
        with engine.autocast():
            loss = objective.loss(engine.train_module, images, targets, weights)[0]
        engine.backward(loss, boundary=True)
        engine.step(no_skip)

    if comm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup, repeats = (1, 2) if context.dry_run else (3, 8)
    seconds = timed(context, step, warmup=warmup, repeats=repeats)
    syncs = count_host_syncs(step)
    flops = training_flops_per_image(config.model)
    images_per_second = batch / seconds
    environment = context.environment()
    achieved = flops * images_per_second
    datasheet = environment.get("datasheet_bf16_tflops")
    gemm = environment.get("gemm", {}).get("tflops")
    return {"engine": kind if kind != "deepspeed" else "deepspeed ZeRO-2", "model": model, "image_size": image_size,
            "batch": batch, "attention": backend, "compile": compiled, "step_ms": seconds * 1e3,
            "images_per_second": images_per_second,
            "tokens_per_second": images_per_second * tokens_per_image(config.model),
            "achieved_tflops": achieved / 1e12,
            "mfu_datasheet": achieved / (datasheet * 1e12) if datasheet else None,
            "mfu_measured_gemm": achieved / (gemm * 1e12) if gemm else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if comm.device.type == "cuda" else None,
            "host_syncs_per_step": syncs}


def count_host_syncs(step: Callable[[], None]) -> int:
    """Tensor methods that make the host wait for the device, called during one step."""
    import torch

    counts = [0]
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(original):
        def method(self, *args, **kwargs):
            counts[0] += 1
            return original(self, *args, **kwargs)
        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts[0]


def _train_rows(context: Context, kind: str, variants_of: Callable[[list], list]) -> dict[str, Any]:
    import torch

    rows = []
    for model, image_size, batch, variants in DRY_TRAIN_MODELS if context.dry_run else TRAIN_MODELS:
        for backend, compiled in variants_of(variants):
            size = batch
            while True:
                try:
                    rows.append(measure_train_step(context, kind, model, image_size, size, backend, compiled))
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if size == 1:
                        rows.append({"model": model, "attention": backend, "compile": compiled,
                                     "error": "out of memory"})
                        break
                    size //= 2  # the batch that fills the card
                except Exception as error:  # noqa: BLE001 - one variant's failure is a row, not the stage's end
                    rows.append({"model": model, "attention": backend, "compile": compiled,
                                 "error": (str(error).strip().splitlines() or [type(error).__name__])[0][:300]})
                    break
            context.partial(f"train_{kind if kind == 'local' else 'deepspeed'}", {"rows": rows})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"rows": rows}


def stage_train_local(context: Context) -> dict[str, Any]:
    return _train_rows(context, "local", lambda variants: variants)


def stage_train_deepspeed(context: Context) -> dict[str, Any]:
    return _train_rows(context, "deepspeed", lambda variants: [v for v in variants if not v[1]][:1])


# ---------------------------------------------------------------------------------------------
# 5. The real job: train.py, a checkpoint, a resume, a scrape.


def stage_train_job(context: Context) -> dict[str, Any]:
    from vitscale.data.datasets import write_digits_shards
    from vitscale.engine import checkpoint as ckpt
    from vitscale.engine import manifest
    from vitscale.engine.distributed import free_port

    job = context.out / "train_job"
    image_size = 16 if context.dry_run else 224
    train_pattern, _ = write_digits_shards(job / "data", image_size=image_size, samples_per_shard=200)
    steps, every = (4, 2) if context.dry_run else (30, 15)
    model = ["model.name=Ti/4", "model.depth=2", "model.width=32", "model.heads=2", "model.mlp_dim=64",
             "engine.precision=fp32", "engine.micro_batch_size=8", "engine.global_batch_size=8"] if context.dry_run \
        else ["model.name=B/16", "engine.precision=bf16", "engine.micro_batch_size=64", "engine.global_batch_size=64"]
    port = free_port()
    common = ["--config", str(REPO / "configs" / "demo.yaml"), *model, f"model.image_size={image_size}",
              "model.num_classes=10", "model.representation_size=null", f"data.train_shards={train_pattern}",
              "data.num_workers=2", f"run.output_dir={job}", "run.name=run", "run.log_every=5",
              f"engine.checkpoint_every={every}", "engine.eval_every=0", "schedule.warmup_steps=2",
              "--ds_config", str(REPO / "configs" / "zero2.json")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                str(REPO / "vitscale" / "train.py")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([*torchrun, *common, f"run.steps={steps}", f"metrics.port={port}"], env=env,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    scrape = scrape_metrics(port, first)
    output = first.communicate(timeout=600)[0]
    resumed = subprocess.run([*torchrun, *common, f"run.steps={steps + every}", f"metrics.port={free_port()}"],
                             env=env, capture_output=True, text=True, timeout=600)
    run_dir = job / "run"
    last = ckpt.latest_complete(run_dir)
    count = ckpt.read_complete(last).get("manifests", 0) if last else 0
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()] \
        if (run_dir / "log.jsonl").is_file() else []
    progress = [r for r in log if "images_per_second" in r]
    return {"first_exit": first.returncode, "resume_exit": resumed.returncode,
            "resumed_from_step": steps if f"at step {steps}" in resumed.stdout + resumed.stderr else None,
            "final_checkpoint": str(last), "final_checkpoint_verifies": bool(last) and not manifest.verify(last, count),
            "scrape": scrape, "last_record": progress[-1] if progress else None,
            "output_tail": (output[-1500:] + resumed.stdout[-1500:] + resumed.stderr[-1500:])}


def scrape_metrics(port: int, process: subprocess.Popen) -> dict[str, Any]:
    """Poll the rank's Prometheus endpoint while the job runs: the last answer that carried the
    training families (ok), with the newest values; a step counted ends the polling early."""
    found: dict[str, Any] = {"ok": False}
    deadline = time.monotonic() + 500
    while process.poll() is None and time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            time.sleep(0.2)
            continue
        values = {}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in ("vitscale_train_steps_total", "vitscale_train_images_per_second", "vitscale_train_mfu_ratio"):
                with contextlib.suppress(ValueError):
                    values[name] = float(line.rsplit(" ", 1)[1])
        if "vitscale_train_steps_total" in values:
            found = {"ok": True, **values}
            if values["vitscale_train_steps_total"] >= 1:
                break
        time.sleep(0.2)
    return found


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": stage_environment, "kernel": stage_kernel, "attention": stage_attention,
    "train_local": stage_train_local, "train_deepspeed": stage_train_deepspeed, "train_job": stage_train_job}


# ---------------------------------------------------------------------------------------------
# The table.


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}%}" if 0 < abs(value) < 1 and digits == -1 else f"{value:,.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    stages = report["stages"]
    lines = [f"# vitscale device check{' (dry run, CPU: code paths only)' if report['dry_run'] else ''}", ""]
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {stage['status']} | {stage['seconds']:.0f} |" for name, stage in stages.items()]
    environment = stages.get("environment", {}).get("result")
    if environment:
        device = environment.get("gpu") or environment.get("cpu")
        lines += ["", f"{device}; torch {environment['torch']}, triton {environment.get('triton', '-')}, CUDA "
                      f"{environment.get('cuda') or '-'}, driver {environment.get('driver', '-')}; GEMM "
                      f"{environment['gemm']['n']}^3 {environment['gemm']['dtype']}: "
                      f"{environment['gemm']['tflops']:.3g} TFLOP/s (datasheet "
                      f"{_number(environment.get('datasheet_bf16_tflops'), 0)}); copy "
                      f"{environment['copy']['gb_per_s']:.0f} GB/s"]
    kernel = stages.get("kernel", {}).get("result")
    if kernel:
        lines += ["", "| kernel check | dtype | call | max abs error out / dq / dk / dv | tolerance | ok |",
                  "|---|---|---|---|---|---|"]
        for row in kernel["rows"]:
            errors = " / ".join(f"{row['max_abs_error'][k]:.1e}" for k in ("out", "dq", "dk", "dv"))
            lines.append(f"| {row['shape']} ({row['tokens']}x{row['head_dim']}) | {row['dtype']} | {row['call']} | "
                         f"{errors} | {row['tolerance']:g} | {'yes' if row['ok'] else 'NO'} |")
    attention = stages.get("attention", {}).get("result")
    if attention:
        lines += ["", f"| attention ({attention['dtype']}) | backend | fwd TFLOP/s | fwd+bwd TFLOP/s |",
                  "|---|---|---|---|"]
        for row in attention["rows"]:
            lines.append(f"| {row['shape']} x{row['batch']} | {row['backend']} | {_number(row.get('fwd_tflops'), 2)} | "
                         f"{_number(row.get('fwd_bwd_tflops'), 2) if 'error' not in row else row['error'][:60]} |")
    for name in ("train_local", "train_deepspeed"):
        result = stages.get(name, {}).get("result")
        if not result:
            continue
        lines += ["", "| train step | engine | attention | compile | batch | img/s | tokens/s | MFU (datasheet) | "
                      "MFU (measured GEMM) | peak GiB | host syncs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            if "error" in row:
                lines.append(f"| {row['model']} | {name} | {row['attention']} | {row['compile']} | | "
                             f"{row['error'][:80]} |")
                continue
            mfu = lambda v: f"{v:.1%}" if v is not None else "-"  # noqa: E731
            lines.append(f"| {row['model']}@{row['image_size']} | {row['engine']} | {row['attention']} | "
                         f"{row['compile']} | {row['batch']} | {row['images_per_second']:,.1f} | "
                         f"{row['tokens_per_second']:,.0f} | {mfu(row['mfu_datasheet'])} | "
                         f"{mfu(row['mfu_measured_gemm'])} | "
                         f"{_number(row['peak_memory_gib'], 1)} | {row['host_syncs_per_step']} |")
    job = stages.get("train_job", {}).get("result")
    if job:
        lines += ["", f"train.py job: exit {job['first_exit']}, resumed from step {job['resumed_from_step']} "
                      f"(exit {job['resume_exit']}), final checkpoint verifies: {job['final_checkpoint_verifies']}, "
                      f"Prometheus scrape: {job['scrape']}"]
    failed = [f"{name}: {stage['status']}\n{stage.get('log', '')[-600:]}" for name, stage in stages.items()
              if stage["status"] != "ok"]
    if failed:
        lines += ["", "Failures (log tails):", "", "```", *failed, "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="vitscale bench device")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
