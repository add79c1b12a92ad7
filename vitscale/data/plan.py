"""Which sample each rank and worker reads, in which order: a pure function of the config.

Layout of one epoch:
- The shard order is a permutation of the shards (seed + epoch), or a draw with replacement in
  resampled mode. Concatenating the shards gives the epoch's sequence of N samples.
- The sequence is padded to steps x world_size x micro_batch by repeating its first samples
  (fewer than world_size x micro_batch of them), so every rank yields `steps` batches: ranks
  never wait on each other in a collective.
- Rank r reads the contiguous slice [r*S, (r+1)*S), S = steps x micro_batch; within a rank, worker
  w reads a contiguous run of whole batches. Several readers may share a shard (sample-level
  split), so any number of shards works; with shards >= readers each reads whole shards.
- Each reader shuffles its slice with a shuffle buffer whose order is computed from positions
  alone (no data), so the order, and hence the resume point, never depends on what was read.
- PyTorch's DataLoader hands out batches round-robin over workers; `interleave` reproduces it.

Resume: the state is (epoch, segments); a segment is a stretch of the epoch run with one
(world_size, workers, micro_batch) and the number of batches each rank yielded in it. Replaying
the segments (no data needed) gives exactly which samples were consumed; a new topology then
splits the not-yet-seen rest of the epoch. Same topology: the same order continues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Topology:
    world_size: int
    workers: int  # readers per rank (>= 1; 0 DataLoader workers means one in-process reader)
    micro_batch: int

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "workers": self.workers, "micro_batch": self.micro_batch}


@dataclass(frozen=True)
class Reader:
    """One (rank, worker)'s share of an epoch segment: positions [start, start + length)."""

    rank: int
    worker: int
    start: int
    length: int
    batches: int


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool, resampled: bool) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    if resampled:
        return rng.integers(0, num_shards, size=num_shards)
    return rng.permutation(num_shards) if shuffle else np.arange(num_shards)


def steps_for(num_samples: int, topology: Topology, *, pad: bool = True) -> int:
    per_step = topology.world_size * topology.micro_batch
    return math.ceil(num_samples / per_step) if pad else num_samples // per_step


def worker_batches(steps: int, workers: int) -> list[int]:
    """Batches each worker produces; the first `steps % workers` workers make one more."""
    return [steps // workers + (w < steps % workers) for w in range(workers)]


def readers(steps: int, topology: Topology, rank: int) -> list[Reader]:
    counts = worker_batches(steps, topology.workers)
    rank_start = rank * steps * topology.micro_batch
    out, first_batch = [], 0
    for worker, batches in enumerate(counts):
        start = rank_start + first_batch * topology.micro_batch
        out.append(Reader(rank, worker, start, batches * topology.micro_batch, batches))
        first_batch += batches
    return out


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """(worker, batch index within worker) in the order the DataLoader yields them."""
    order = []
    for round_index in range(max(counts, default=0)):
        order.extend((w, round_index) for w, c in enumerate(counts) if c > round_index)
    return order


def consumed_per_worker(counts: list[int], batches_yielded: int) -> list[int]:
    done = [0] * len(counts)
    for worker, _ in interleave(counts)[:batches_yielded]:
        done[worker] += 1
    return done


def buffer_shuffle_order(length: int, buffer_size: int, rng_key: tuple[int, ...]) -> np.ndarray:
    """Emission order of a streaming shuffle buffer over slots 0..length-1: order[i] is the slot
    emitted i-th. Slots arrive in order; the buffer holds `buffer_size`."""
    rng = np.random.default_rng(list(rng_key))
    size = max(1, min(buffer_size, length))
    if size == 1:
        return np.arange(length)
    picks = rng.integers(0, size, size=max(0, length - size))
    buffer = list(range(size))
    order = np.empty(length, dtype=np.int64)
    for i, pick in enumerate(picks):  # buffer full: emit one, take the next slot in its place
        order[i], buffer[pick] = buffer[pick], size + i
    order[len(picks):] = np.asarray(buffer)[rng.permutation(len(buffer))]
    return order


@dataclass
class EpochPlan:
    """Positions of one epoch segment -> sample ids (index into the epoch's concatenated shards)."""

    epoch: int
    segment: int
    topology: Topology
    num_samples: int  # samples still to be seen in this epoch
    steps: int
    # Their ids in reading order; None means all of them, 0..num_samples-1 (no array for 14M ids).
    sequence: np.ndarray | None = None

    def sample_at(self, position: int) -> tuple[int, bool]:
        """(sample id, is_padding) of a padded position."""
        index = position % self.num_samples
        sample = index if self.sequence is None else int(self.sequence[index])
        return sample, position >= self.num_samples

    def ids(self) -> np.ndarray:
        return np.arange(self.num_samples, dtype=np.int64) if self.sequence is None else self.sequence

    def reader_order(self, reader: Reader, buffer_size: int, seed: int) -> np.ndarray:
        key = (seed, self.epoch, self.segment, reader.start, 0xB0F)
        return buffer_shuffle_order(reader.length, buffer_size, key)


def plan_epoch(num_samples: int, *, epoch: int, topology: Topology, seed: int, buffer_size: int,
               history: list[dict], pad: bool = True) -> EpochPlan:
    """The current segment's plan, after replaying the finished segments in `history`.

    history: [{"world_size", "workers", "micro_batch", "batches"}], the segments of this epoch
    before the current one (each ended by a restart with a different topology).
    """
    sequence = None
    for segment, past in enumerate(history):
        old = Topology(past["world_size"], past["workers"], past["micro_batch"])
        old_plan = EpochPlan(epoch, segment, old, num_samples, steps_for(num_samples, old, pad=pad), sequence)
        sequence = _unseen(old_plan, int(past["batches"]), seed, buffer_size)
        num_samples = len(sequence)
    steps = steps_for(num_samples, topology, pad=pad) if num_samples else 0
    return EpochPlan(epoch, len(history), topology, num_samples, steps, sequence)


def _unseen(plan: EpochPlan, batches_per_rank: int, seed: int, buffer_size: int) -> np.ndarray:
    """Sample ids of `plan` not yet consumed after every rank yielded `batches_per_rank` batches."""
    n = plan.num_samples
    seen = np.zeros(n, dtype=bool)
    for rank in range(plan.topology.world_size):
        rank_readers = readers(plan.steps, plan.topology, rank)
        done = consumed_per_worker([r.batches for r in rank_readers], batches_per_rank)
        for reader, batches in zip(rank_readers, done):
            order = plan.reader_order(reader, buffer_size, seed)
            positions = reader.start + order[: batches * plan.topology.micro_batch]
            seen[positions[positions < n]] = True
    return plan.ids()[~seen]
