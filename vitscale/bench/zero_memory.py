"""`vitscale bench zero-memory`: per-rank model-state bytes per parameter of ZeRO-0..3, measured
against the formula the engine and the planner use (vitscale/engine/ds_config.py).

    vitscale bench zero-memory                          # S/16 (22 M parameters), fp32 AdamW, 2 CPU ranks
    vitscale bench zero-memory --stages 2 --bucket 5e8  # what DeepSpeed's own default bucket costs

Each stage runs `--world-size` ranks of the real DeepSpeed engine (build_engine with
configs/zeroN.json) on a tiny input (32 px: 5 tokens, so activations are negligible), two
micro-batches per step. Measured, over the parameter count:
- between the two micro-batches: the bytes of every live tensor (weights, gradients or their
  partitions, master copy, moments, buckets), the steady state `vitscale plan` predicts;
- the peak resident memory of each rank over steps 2-4 (the high-water mark is reset after the
  first step, so start-up's one-off copies are excluded), minus its resident memory just before
  the model is built and minus the resident memory that is not tensors (resident minus the bytes
  of every live tensor storage, between steps). glibc is told to map every allocation above
  64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed buffers leave the resident set and the
  peak is what was live.
On a GPU the same run reads torch.cuda's allocated bytes instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="S/16", help="model.name (default S/16, 22 M parameters)")
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages, comma-separated")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--bucket", type=float, default=None,
                        help="bucket size in elements instead of the engine's auto sizing "
                             "(e.g. 5e8, DeepSpeed's default)")
    parser.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                        help="a zero_optimization setting of the JSON, e.g. stage3_max_live_parameters=1e7 "
                             "(repeatable)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after the first")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return worker(json.loads(args.worker))
    from vitscale.engine.distributed import free_port

    rows = []
    for stage in parse_stages(args.stages):
        spec = {"model": args.model, "stage": stage, "world_size": args.world_size, "bucket": args.bucket,
                "steps": args.steps, "zero": dict(item.split("=", 1) for item in args.zero)}
        port = free_port()
        procs = []
        for rank in range(args.world_size):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.world_size),
                   "LOCAL_WORLD_SIZE": str(args.world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
            env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
            procs.append(subprocess.Popen([sys.executable, "-m", "vitscale.bench.zero_memory", "--worker",
                                           json.dumps(spec)], env=env, stdout=subprocess.PIPE, text=True))
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=900)
            if proc.returncode:
                print(f"vitscale bench zero-memory: {label(stage)} rank failed (exit {proc.returncode})",
                      file=sys.stderr)
                return 1
            results.append(json.loads(out.strip().splitlines()[-1]))
        rows.append(summarise(stage, results))
    report(args, rows)
    return 0


def parse_stages(text: str) -> list[int | str]:
    stages: list[int | str] = []
    for item in (part.strip() for part in text.split(",")):
        if item not in ("0", "1", "2", "3", "fsdp2"):
            from vitscale.errors import ConfigError

            raise ConfigError("--stages", f"{item!r} is neither a ZeRO stage nor fsdp2", "use e.g. 0,1,2,3,fsdp2")
        stages.append(item if item == "fsdp2" else int(item))
    return stages


def label(stage: int | str) -> str:
    return "FSDP2" if stage == "fsdp2" else f"ZeRO-{stage}"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarise(stage: int, results: list[dict]) -> dict:
    worst = max(results, key=lambda r: r["peak_bytes"])
    return {"stage": stage, **{k: worst[k] for k in ("parameters", "world_size", "theory", "allowance", "buckets",
                                                      "device")},
            "measured": worst["peak_bytes"] / worst["parameters"],
            "held": worst["held_bytes"] / worst["parameters"],
            "window": worst["window_bytes"] / worst["parameters"],
            "per_rank": [r["peak_bytes"] / r["parameters"] for r in results]}


def report(args, rows: list[dict]) -> None:
    first = rows[0]
    print(f"vitscale bench zero-memory: {args.model}, {first['parameters'] / 1e6:.1f} M parameters, fp32 AdamW, "
          f"{first['world_size']} ranks, {first['device']}; bytes per parameter per rank (largest rank)")
    print("| engine | peak | between micro-batches | held between steps | theory | + bucket allowance | = bound "
          "| peak / bound | buckets (elements) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        bound = row["theory"] + row["allowance"]
        row["ratio_to_bound"] = row["measured"] / bound
        buckets = ", ".join(f"{k.replace('_bucket_size', '')} {v:.3g}" for k, v in row["buckets"].items()) or "-"
        print(f"| {label(row['stage'])} | {row['measured']:.2f} | {row['window']:.2f} | {row['held']:.2f} | "
              f"{row['theory']:.2f} | "
              f"{row['allowance']:.2f} | "
              f"{bound:.2f} | {row['ratio_to_bound']:.3f} | {buckets} |")
    print("theory: P + G + K over their partitions (ds_config.model_state_bytes_per_parameter): fp32 weights P=4, "
          "gradients G=4, K=12 = DeepSpeed's fp32 master copy + Adam's two moments (kept even for an fp32 model)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))


# ---------------------------------------------------------------------------------------------
# One rank.


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # Linux: reset the resident high-water mark to the current size


def live_tensor_bytes(also=()) -> int:
    """Bytes of every distinct tensor storage Python can reach (parameters, DeepSpeed's flat
    buffers and partitions, optimizer moments, buckets): what an allocator would hold. `also`:
    tensors autograd holds without a Python object (a parameter's .grad until it is read)."""
    import gc

    import torch

    storages = {}
    for obj in [*gc.get_objects(), *(t for t in also if t is not None)]:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            with contextlib.suppress(RuntimeError):
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def worker(spec: dict) -> int:
    import torch

    from vitscale.config import load_config
    from vitscale.engine import Launch, build_engine, start_process_group
    from vitscale.engine.deepspeed import quiet_library_logs
    from vitscale.engine.distributed import stop_process_group
    from vitscale.engine.ds_config import (bucket_allowance_bytes_per_parameter, deepspeed_config,
                                           fill_bucket_sizes, model_state_bytes_per_parameter, read_ds_json)
    from vitscale.model.vit import build_model

    stage, world = spec["stage"], spec["world_size"]
    fsdp2 = stage == "fsdp2"
    engine_settings = ["engine.kind=fsdp2"] if fsdp2 else ["engine.kind=deepspeed", f"engine.zero_stage={stage}"]
    config = load_config(None, [f"model.name={spec['model']}", "model.image_size=32", "model.num_classes=1000",
                                "model.representation_size=null", "model.attention_backend=math",
                                *engine_settings, "engine.precision=fp32",
                                "engine.micro_batch_size=1", f"engine.global_batch_size={2 * world}",
                                "engine.collective_timeout_seconds=600"])
    ds_json = read_ds_json(REPO / "configs" / f"zero{stage}.json") if stage and not fsdp2 else None
    ds = deepspeed_config(config, world, ds_json) if not fsdp2 else {"zero_optimization": {}}
    if spec["bucket"] is not None:
        for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
            if key in ds["zero_optimization"]:
                ds["zero_optimization"][key] = int(spec["bucket"])
    quiet_library_logs()  # imports DeepSpeed before the baseline is read
    for key, value in spec["zero"].items():
        if stage:
            ds["zero_optimization"][key] = json.loads(value) if not value.replace(".", "").replace("e", "").isdigit() \
                else int(float(value))
    comm = start_process_group(config, Launch.from_environment())
    cuda = comm.device.type == "cuda"
    torch.manual_seed(0)
    baseline = torch.cuda.memory_allocated() if cuda else resident_bytes()
    model = build_model(config.model)
    parameters = sum(p.numel() for p in model.parameters())
    engine = build_engine(config, model, comm, ds_config=None if fsdp2 else ds)
    images = torch.randn(1, 3, 32, 32, device=comm.device)
    targets = torch.randint(0, 1000, (1,), device=comm.device)

    within_window = []

    def step(measure: bool = False) -> None:
        # Two micro-batches per step: between them every stage holds its steady-state model
        # states (ZeRO-1 the whole accumulated gradient, ZeRO-2/3 their reduced partitions).
        for boundary in (False, True):
            logits = engine.train_module(images.to(engine.input_dtype))
            engine.backward(torch.nn.functional.cross_entropy(logits.float(), targets), boundary=boundary)
            del logits
            if measure and not boundary:
                within_window.append(torch.cuda.memory_allocated() - baseline if cuda else
                                     live_tensor_bytes([p.grad for p in model.parameters()]))
        engine.step(torch.zeros((), dtype=torch.bool, device=comm.device))

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for index in range(spec["steps"]):
            step(measure=index == spec["steps"] - 1)
        peak, held = torch.cuda.max_memory_allocated() - baseline, torch.cuda.memory_allocated() - baseline
    else:
        reset_peak()
        for index in range(spec["steps"]):
            step(measure=index == spec["steps"] - 1)
        # Resident memory that is not tensors (allocator arenas, library state: measured between
        # steps as resident minus live tensor bytes) is taken as constant through the step.
        held = live_tensor_bytes()
        peak = peak_resident_bytes() - baseline - max(0, resident_bytes() - baseline - held)
    zero = fill_bucket_sizes(dict(ds), parameters).get("zero_optimization", {}) if stage else {}
    buckets = {k: float(zero[k]) for k in ("reduce_bucket_size", "allgather_bucket_size",
                                           "stage3_prefetch_bucket_size") if k in zero and stage}
    if fsdp2:
        from vitscale.plan.estimate import ParameterCounts, fsdp2_memory

        states, held_buffers, transient = fsdp2_memory(world, ParameterCounts.of(config.model), "fp32", 8,
                                                       accumulation=2)
        theory, allowance = states / parameters, (held_buffers + transient) / parameters
    else:
        theory = model_state_bytes_per_parameter(stage, world, weight_bytes=4, gradient_bytes=4)
        allowance = bucket_allowance_bytes_per_parameter(zero if stage else {}, stage, parameters, weight_bytes=4,
                                                         gradient_bytes=4, world_size=world)
    print(json.dumps({"rank": int(os.environ["RANK"]), "parameters": parameters, "world_size": world,
                      "peak_bytes": peak, "held_bytes": held, "window_bytes": within_window[-1],
                      "theory": theory, "allowance": allowance,
                      "buckets": buckets,
                      "device": torch.cuda.get_device_name() if cuda else "CPU"}), flush=True)
    comm.barrier()
    stop_process_group()
    # The result is out; skip interpreter teardown, where a library thread still alive can abort
    # the process ("terminate called without an active exception") after a successful run.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="vitscale bench zero-memory")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
