"""`vitscale bench checkpoint`: save, verify and load throughput of a real engine's checkpoint,
against the raw sequential write and read speed of the same directory, measured in the same run.

    vitscale bench checkpoint --model B/16 --dir /scratch/ckpt       # DCP (engine.kind=local)
    vitscale bench checkpoint --engine deepspeed --dir ...           # DeepSpeed ZeRO-2, one rank

The state is the engine's own after one AdamW step (fp32 weights and two moments: 12 bytes per
parameter), written by the code a training save runs: `engine.save` (DCP or DeepSpeed's files,
each fsync'd) and the checksum manifest (vitscale/engine/manifest.py). Raw baseline: the same
number of bytes written in 8 MiB blocks to one file and fsync'd, then read back. Reads come from
the page cache unless `--drop-caches` (root) empties it first; the table says which.

Each repeat saves the same state twice: synchronously (the step is blocked for the whole write)
and with `engine.save_async` as engine.checkpoint_async=true does (blocked only while the state
is staged to host memory; a writer thread writes it). The two saves' files are compared by
checksum (DCP's .metadata, which carries a fresh save id, left out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

BLOCK = 8 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="B/16", help="model.name (default B/16: 86 M parameters, ~1 GB of state)")
    parser.add_argument("--engine", choices=("local", "deepspeed"), default="local")
    parser.add_argument("--dir", default="runs/bench_checkpoint", help="the directory to measure (emptied first)")
    parser.add_argument("--repeats", type=int, default=2, help="saves and loads timed (the best is kept)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each read (root)")
    parser.add_argument("--json", default=None, help="write the results here")


def drop_caches(enabled: bool) -> bool:
    if not enabled:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def raw_write_read(directory: Path, size: int, drop: bool) -> tuple[float, float, bool]:
    """Seconds to write `size` bytes sequentially and fsync them, and to read them back."""
    path = directory / "raw.bin"
    block = os.urandom(BLOCK)
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        written = 0
        while written < size:
            written += handle.write(block[: min(BLOCK, size - written)])
        os.fsync(handle.fileno())
    write_seconds = time.perf_counter() - started
    cold = drop_caches(drop)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(BLOCK)
        while handle.readinto(buffer):
            pass
    read_seconds = time.perf_counter() - started
    path.unlink()
    return write_seconds, read_seconds, cold


def engine_file_digests(directory: Path) -> dict[str, str]:
    """{file: checksum} of a single-rank checkpoint's engine files, from its manifest."""
    from vitscale.engine import manifest

    files = json.loads(manifest.manifest_path(directory, 0).read_text())["files"]
    return {name: entry[manifest.DIGEST] for name, entry in files.items() if not name.endswith(".metadata")}


def build(args):
    import torch

    from vitscale.config import load_config
    from vitscale.engine import Launch, build_engine, start_process_group
    from vitscale.engine.ds_config import deepspeed_config, read_ds_json
    from vitscale.objectives import build_objective
    from vitscale.train import build_model

    overrides = [f"model.name={args.model}", "model.image_size=32", "model.num_classes=1000",
                 "model.attention_backend=sdpa", f"engine.kind={args.engine}", "engine.precision=fp32",
                 "engine.micro_batch_size=1", "engine.global_batch_size=1"]
    config = load_config(None, overrides)
    comm = start_process_group(config, Launch.from_environment())
    repo = Path(__file__).resolve().parents[2]
    ds = deepspeed_config(config, 1, read_ds_json(repo / "configs" / "zero2.json")) \
        if args.engine == "deepspeed" else None
    objective = build_objective(config)
    engine = build_engine(config, build_model(config, objective), comm, ds_config=ds)
    images = torch.randn(1, 3, 32, 32, device=comm.device)
    with engine.autocast():
        loss = objective.loss(engine.train_module, images, torch.zeros(1, dtype=torch.long, device=comm.device),
                              torch.ones(1, device=comm.device))[0]
    engine.backward(loss, boundary=True)
    engine.step(torch.zeros((), dtype=torch.bool, device=comm.device))  # the moments exist now
    return engine


def run(args: argparse.Namespace) -> int:
    from vitscale.engine import manifest

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    engine = build(args)
    saves, loads, verifies, size = [], [], [], 0
    blocked, background, identical = [], [], True
    for attempt in range(max(1, args.repeats)):
        path, async_path = root / f"step_{attempt:08d}", root / f"async_{attempt:08d}"
        path.mkdir()
        async_path.mkdir()
        started = time.perf_counter()
        failure = engine.save(path)
        if failure:
            print(f"vitscale bench checkpoint: the save failed: {failure}")
            return 1
        size = manifest.write_manifest(path, 0, list(engine.saved_files))
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        pending = engine.save_async(async_path)
        blocked.append(time.perf_counter() - started)
        failure = pending.result()
        if failure:
            print(f"vitscale bench checkpoint: the background save failed: {failure}")
            return 1
        manifest.write_manifest(async_path, 0, list(engine.saved_files))
        background.append(time.perf_counter() - started)
        identical &= engine_file_digests(path) == engine_file_digests(async_path)
        shutil.rmtree(async_path)
        cold = drop_caches(args.drop_caches)
        started = time.perf_counter()
        problems = manifest.verify(path, 1)
        verifies.append(time.perf_counter() - started)
        assert not problems, problems
        drop_caches(args.drop_caches)
        started = time.perf_counter()
        engine.load(path, saved_world_size=1)
        loads.append(time.perf_counter() - started)
        shutil.rmtree(path)
    raw_write, raw_read, raw_cold = raw_write_read(root, size, args.drop_caches)
    gb = size / 1e9
    rows = [("save (engine files + manifest, fsync'd)", gb / min(saves), gb / raw_write),
            ("verify (xxh3-128 of every file)", gb / min(verifies), gb / raw_read),
            ("load (engine.load)", gb / min(loads), gb / raw_read)]
    print(f"vitscale bench checkpoint: {args.model}, engine.kind={args.engine}, {gb:.2f} GB of state, in {root} "
          f"(reads {'after dropping the page cache' if cold and raw_cold else 'from the page cache'})")
    print("| operation | GB/s | raw sequential GB/s (same directory, same run) | ratio |")
    print("|---|---|---|---|")
    for name, rate, raw in rows:
        print(f"| {name} | {rate:.2f} | {raw:.2f} | {rate / raw:.2f} |")
    print(f"blocked time of a save: synchronous {min(saves):.2f} s, asynchronous {min(blocked):.2f} s "
          f"({min(blocked) / min(saves):.1%} of it; the background write took {min(background):.2f} s); "
          f"files of both saves {'identical' if identical else 'DIFFERENT'} by checksum")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": args.model, "engine": args.engine, "bytes": size, "save_seconds": saves, "load_seconds": loads,
            "verify_seconds": verifies, "async_blocked_seconds": blocked, "async_total_seconds": background,
            "async_files_identical": identical, "raw_write_seconds": raw_write, "raw_read_seconds": raw_read,
            "cold_reads": bool(cold and raw_cold),
            "rows": [{"operation": n, "gb_per_s": r, "raw_gb_per_s": w, "ratio": r / w} for n, r, w in rows]},
            indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0 if identical else 1
