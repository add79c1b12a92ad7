"""Replay benchmark: how long a resume after a topology change takes to find the unseen rest of the
epoch, and how much memory it holds, at the scale of a large job (no data is read: the replay is
a pure function of the saved position).

    vitscale bench replay --samples 100000000 --world-size 4096 --workers 4
    /usr/bin/time -v python -m vitscale.data.replay_bench    # numpy only: the process's own peak

The job ran `--done` of its epoch on (world_size, workers, micro_batch) and resumes on half the
ranks. The baseline, measured in the same run at `--baseline-samples`, replays the same segment
with a step-by-step streaming buffer per reader (the textbook loop) and a boolean array of ids.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc

import numpy as np

from vitscale.data import plan as planning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=100_000_000, help="samples per epoch (default 100 M)")
    parser.add_argument("--world-size", type=int, default=4096, help="ranks before the resume (default 4096)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank (default 4)")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--buffer", type=int, default=5000, help="data.shuffle_buffer (default 5000)")
    parser.add_argument("--done", type=float, default=0.5, help="fraction of the epoch done before (default 0.5)")
    parser.add_argument("--baseline-samples", type=int, default=1_000_000,
                        help="epoch size for the baseline comparison (default 1 M; the loop is slow)")
    parser.add_argument("--output", default="", help="write the results as JSON here")


def replay_seconds(samples: int, args, step_by_step: bool = False) -> tuple[float, int]:
    """(seconds, samples left) to plan the resumed segment after the first one."""
    before = planning.Topology(args.world_size, args.workers, args.micro_batch)
    after = planning.Topology(max(1, args.world_size // 2), args.workers, args.micro_batch)
    batches = int(planning.steps_for(samples, before) * args.done)
    history = [{**before.to_dict(), "batches": batches}]
    started = time.perf_counter()
    if step_by_step:
        left = _step_by_step_unseen(samples, before, batches, args.buffer)
    else:
        left = planning.plan_epoch(samples, epoch=0, topology=after, seed=0, buffer_size=args.buffer,
                                   history=history).num_samples
    return time.perf_counter() - started, left


def _step_by_step_unseen(samples: int, topology: planning.Topology, batches: int, buffer_size: int) -> int:
    seen = np.zeros(samples, dtype=bool)
    steps = planning.steps_for(samples, topology)
    keys = planning.ShuffleKeys.of(0, 0, 0)
    for rank in range(topology.world_size):
        rank_readers = planning.readers(steps, topology, rank)
        done = planning.consumed_per_worker([r.batches for r in rank_readers], batches)
        for reader, count in zip(rank_readers, done):
            size = max(1, min(buffer_size, reader.length))
            draws = planning.uniform(keys.picks, np.arange(reader.start, reader.start + reader.length - size))
            buffer, emitted = list(range(size)), []
            for step, draw in enumerate(draws):
                pick = min(int(draw * size), size - 1)
                emitted.append(buffer[pick])
                buffer[pick] = size + step
            drain = planning.uniform(keys.drain, np.arange(reader.start, reader.start + size))
            emitted += [buffer[i] for i in np.argsort(drain, kind="stable")]
            positions = reader.start + np.asarray(emitted[: count * topology.micro_batch], dtype=np.int64)
            seen[positions[positions < samples]] = True
    return int((~seen).sum())


def run(args) -> int:
    base_new, left_new = replay_seconds(args.baseline_samples, args)
    base_old, left_old = replay_seconds(args.baseline_samples, args, step_by_step=True)
    assert left_new == left_old, "the two replays disagree"
    tracemalloc.start()  # numpy reports its arrays to it: the replay's own peak allocation
    full, left = replay_seconds(args.samples, args)
    replay_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [("step-by-step buffer (baseline)", args.baseline_samples, base_old, 1.0),
            ("vitscale replay", args.baseline_samples, base_new, base_old / base_new),
            ("vitscale replay", args.samples, full, None)]
    print(f"topology-change replay: {args.world_size} ranks x {args.workers} workers, micro-batch "
          f"{args.micro_batch}, buffer {args.buffer}, {args.done:.0%} of the epoch done, resumed on "
          f"{max(1, args.world_size // 2)} ranks")
    print(f"{'replay':32} {'samples':>12} {'seconds':>9} {'speed-up':>9}")
    for name, samples, seconds, ratio in rows:
        print(f"{name:32} {samples:>12,} {seconds:>9.2f} {'' if ratio is None else f'{ratio:.1f}x':>9}")
    print(f"samples left at {args.samples:,}: {left:,}; peak memory of the replay: {replay_mb:.0f} MB "
          f"(process peak resident, imports and baseline included: {peak_mb:.0f} MB)")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"samples": args.samples, "world_size": args.world_size, "workers": args.workers,
                       "micro_batch": args.micro_batch, "buffer": args.buffer, "done": args.done,
                       "seconds": full, "samples_left": left, "replay_peak_mb": replay_mb,
                       "process_peak_rss_mb": peak_mb,
                       "baseline": {"samples": args.baseline_samples, "step_by_step_seconds": base_old,
                                    "vitscale_seconds": base_new}}, handle, indent=1)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
