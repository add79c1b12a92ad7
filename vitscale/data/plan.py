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
- PyTorch's DataLoader hands out batches round-robin over workers; `interleave` reproduces it
  (and `consumed_per_worker` counts it in closed form).

Resume: the state is (epoch, segments); a segment is a stretch of the epoch run with one
(world_size, workers, micro_batch) and the number of batches each rank yielded in it. Replaying
the segments (no data needed) gives exactly which samples were consumed (one bit per sample); a
new topology then splits the not-yet-seen rest of the epoch. Same topology: the same order
continues. The replay runs once per process, before the DataLoader starts its workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


REPLAY_BLOCK_SLOTS = 1 << 18  # reader slots replayed per array operation: ~10 arrays of 8 MB


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
    """Batches taken from each worker after `batches_yielded` round-robin yields (what `interleave`
    gives, counted in closed form: one step per distinct count, not per batch)."""
    done, left, round_index = [0] * len(counts), batches_yielded, 0
    while left > 0:
        active = [w for w, c in enumerate(counts) if c > round_index]
        if not active:
            break
        # Whole rounds in which this set of workers stays active.
        rounds = min(min(counts[w] for w in active) - round_index, left // len(active))
        if rounds == 0:  # a partial round: the lowest-numbered workers yield first
            for w in active[:left]:
                done[w] += 1
            break
        for w in active:
            done[w] += rounds
        left -= rounds * len(active)
        round_index += rounds
    return done


def next_worker(counts: list[int], batches_yielded: int) -> int:
    """The worker whose batch the DataLoader yields after `batches_yielded` (0 once all are out)."""
    done = consumed_per_worker(counts, batches_yielded)
    active = [w for w, c in enumerate(counts) if c > done[w]]
    if not active:
        return 0
    current = min(done[w] for w in active)
    return next(w for w in active if done[w] == current)


# Counter-based randomness: draw i of a stream is splitmix64(key + i x golden ratio), so any draw
# is computed from its position alone, for many readers in one array operation.
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def stream_key(*parts: int) -> np.uint64:
    return np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]


def hashes(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    """Uniform 64-bit draws, one per counter (any shape): the counters-th draws of the key's stream."""
    x = counters.astype(np.uint64, copy=False) * _GOLDEN
    x += key
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def uniform(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 per counter (53 bits of each draw)."""
    return (hashes(key, counters) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _counters(starts: np.ndarray, count: int) -> np.ndarray:
    return starts.astype(np.uint64)[:, None] + np.arange(count, dtype=np.uint64)


@dataclass(frozen=True)
class ShuffleKeys:
    """The two streams of one epoch segment's shuffle buffers (counters: slice positions)."""

    picks: np.uint64
    drain: np.uint64

    @staticmethod
    def of(seed: int, epoch: int, segment: int) -> "ShuffleKeys":
        return ShuffleKeys(stream_key(seed, epoch, segment, 0xB0F), stream_key(seed, epoch, segment, 0xD4A))


def _stream_through(starts: np.ndarray, length: int, size: int, keys: ShuffleKeys):
    """Streaming phase of a shuffle buffer of `size` over R slices of `length` slots at once.

    Slots arrive in order; step i (i < length - size) emits the slot at buffer place picks[i] and
    puts slot size + i there. So step i emits what the latest earlier step with the same pick put
    there, or the place's first slot: grouping steps by pick (a stable sort per row) finds it for
    all steps at once. -> (emitted (R, length - size), buffer left at the end (R, size))."""
    rows, steps = len(starts), length - size
    final = np.broadcast_to(np.arange(size, dtype=np.int64), (rows, size)).copy()
    if steps <= 0:
        return np.empty((rows, 0), dtype=np.int64), final
    picks = np.minimum((uniform(keys.picks, _counters(starts, steps)) * size).astype(np.int64), size - 1)
    by_place = np.argsort(picks.astype(np.uint16) if size <= 1 << 16 else picks, axis=1, kind="stable")
    places = np.take_along_axis(picks, by_place, axis=1)
    same = places[:, 1:] == places[:, :-1]
    follows = np.zeros((rows, steps), dtype=bool)
    follows[:, 1:] = same
    earlier = np.zeros((rows, steps), dtype=np.int64)
    earlier[:, 1:] = by_place[:, :-1]
    emitted = np.empty((rows, steps), dtype=np.int64)
    np.put_along_axis(emitted, by_place, np.where(follows, size + earlier, places), axis=1)
    last = np.ones((rows, steps), dtype=bool)
    last[:, :-1] = ~same
    row, column = np.nonzero(last)
    final[row, places[row, column]] = size + by_place[row, column]
    return emitted, final


def _drain_keys(starts: np.ndarray, size: int, keys: ShuffleKeys) -> np.ndarray:
    """Random 64-bit sort keys of the buffer places (R, size): the rest is emitted in their order."""
    return hashes(keys.drain, _counters(starts, size))


def buffer_shuffle_order(start: int, length: int, buffer_size: int, keys: ShuffleKeys) -> np.ndarray:
    """Emission order of a streaming shuffle buffer over the slots 0..length-1 of the slice that
    starts at position `start`: order[i] is the slot emitted i-th."""
    size = max(1, min(buffer_size, length))
    if size == 1:
        return np.arange(length, dtype=np.int64)
    starts = np.array([start], dtype=np.int64)
    emitted, final = _stream_through(starts, length, size, keys)
    drain = np.take_along_axis(final, np.argsort(_drain_keys(starts, size, keys), axis=1, kind="stable"), axis=1)
    return np.concatenate([emitted[0], drain[0]])


def first_emitted(starts: np.ndarray, length: int, buffer_size: int, count: int, keys: ShuffleKeys) -> np.ndarray:
    """Which slots each of R slices' buffers emitted first, `count` of them: a bool mask (R, length).
    A resume needs the set, not the order, so the drain needs a partition, not a sort; and once
    the streaming phase is over (count >= length - size) what was streamed is simply everything
    but the buffer's last contents, found without sorting."""
    rows = len(starts)
    size = max(1, min(buffer_size, length))
    mask = np.zeros((rows, length), dtype=bool)
    if size == 1 or count == length:
        mask[:, :count] = True
        return mask
    steps = length - size
    if count <= steps:
        emitted, _ = _stream_through(starts, length, size, keys)
        mask.reshape(-1)[(np.arange(rows)[:, None] * length + emitted[:, :count]).ravel()] = True
        return mask
    final = _last_buffer(starts, length, size, keys)
    drain_keys = _drain_keys(starts, size, keys)
    drained = count - steps
    threshold = np.partition(drain_keys, drained - 1, axis=1)[:, drained - 1:drained]
    mask[:] = True
    left = final[drain_keys > threshold].reshape(rows, size - drained)  # 64-bit keys: no ties
    mask.reshape(-1)[(np.arange(rows)[:, None] * length + left).ravel()] = False
    return mask


def _last_buffer(starts: np.ndarray, length: int, size: int, keys: ShuffleKeys) -> np.ndarray:
    """What each buffer holds when its slots run out (R, size): place p holds the slot put there
    by the last step that picked p (slot size + step), or its first slot p."""
    rows, steps = len(starts), length - size
    final = np.broadcast_to(np.arange(size, dtype=np.int64), (rows, size)).copy()
    picks = np.minimum((uniform(keys.picks, _counters(starts, steps)) * size).astype(np.int64), size - 1)
    flat = (np.arange(rows, dtype=np.int64)[:, None] * size + picks).ravel()
    np.maximum.at(final.reshape(-1), flat, np.broadcast_to(size + np.arange(steps, dtype=np.int64), picks.shape).ravel())
    return final


class Consumed:
    """Which of an epoch's N sample ids earlier segments consumed: one bit per id (12.5 MB at
    100 M samples). The ids still to come, in order, are its zero bits; `zeros_before[w]` counts
    those in words < w, so the p-th of them is found by a binary search and one word's bits."""

    def __init__(self, total: int, words: np.ndarray | None = None):
        self.total = total
        self.words = np.zeros(-(-total // 64), dtype=np.uint64) if words is None else words
        zeros = 64 - np.bitwise_count(self.words).astype(np.int64)
        zeros[-1:] -= len(self.words) * 64 - total  # bits past the last id are not ids
        self.zeros_before = np.concatenate([[0], np.cumsum(zeros)])

    @property
    def remaining(self) -> int:
        return int(self.zeros_before[-1])

    def nth_remaining(self, positions: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """Ids of the remaining samples at these positions (0 = the first id not consumed)."""
        out = np.empty(len(positions), dtype=np.int64)
        for first in range(0, len(positions), block):  # 64 bytes per position and step: bounded
            part = positions[first:first + block]
            word = np.searchsorted(self.zeros_before, part, side="right") - 1
            rank = part - self.zeros_before[word]
            bits = np.unpackbits(self.words[word].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
            free = np.cumsum(1 - bits, axis=1, dtype=np.uint8)  # free bits up to each bit of the word
            out[first:first + block] = word * 64 + np.argmax(free > rank[:, None], axis=1)
        return out

    def remaining_between(self, first: int, last: int) -> np.ndarray:
        """The remaining ids from the one at position `first` to the one at `last`, in order."""
        low, high = self.nth_remaining(np.array([first, last]))
        start = low - low % 64
        bits = np.unpackbits(self.words[start // 64:high // 64 + 1].view(np.uint8), bitorder="little")
        ids = start + np.flatnonzero(bits[:high - start + 1] == 0)
        return ids[ids >= low]


@dataclass
class EpochPlan:
    """Positions of one epoch segment -> sample ids (index into the epoch's concatenated shards)."""

    epoch: int
    segment: int
    topology: Topology
    num_samples: int  # samples still to be seen in this epoch
    steps: int
    # What earlier segments of the epoch consumed; None: nothing (the ids are 0..num_samples-1).
    consumed: Consumed | None = None

    def reader_ids(self, reader: Reader) -> np.ndarray:
        """Sample id of each of the reader's positions, in position order; -1 for padding."""
        ids = np.full(reader.length, -1, dtype=np.int64)
        real = max(0, min(reader.length, self.num_samples - reader.start))
        if real:
            if self.consumed is None:
                ids[:real] = np.arange(reader.start, reader.start + real)
            else:
                ids[:real] = self.consumed.remaining_between(reader.start, reader.start + real - 1)
        return ids

    def reader_order(self, reader: Reader, buffer_size: int, seed: int) -> np.ndarray:
        return buffer_shuffle_order(reader.start, reader.length, buffer_size,
                                    ShuffleKeys.of(seed, self.epoch, self.segment))


def plan_epoch(num_samples: int, *, epoch: int, topology: Topology, seed: int, buffer_size: int,
               history: list[dict], pad: bool = True) -> EpochPlan:
    """The current segment's plan, after replaying the finished segments in `history`.

    history: [{"world_size", "workers", "micro_batch", "batches"}], the segments of this epoch
    before the current one (each ended by a restart with a different topology). The replay reads
    no data and holds one bit per sample: seconds and tens of MB at 100 M samples and 4,096 ranks.
    """
    consumed, remaining = None, num_samples
    for segment, past in enumerate(history):
        old = Topology(past["world_size"], past["workers"], past["micro_batch"])
        old_plan = EpochPlan(epoch, segment, old, remaining, steps_for(remaining, old, pad=pad), consumed)
        consumed = _consume(old_plan, int(past["batches"]), seed, buffer_size, num_samples)
        remaining = consumed.remaining
    steps = steps_for(remaining, topology, pad=pad) if remaining else 0
    return EpochPlan(epoch, len(history), topology, remaining, steps, consumed)


def _consume(plan: EpochPlan, batches_per_rank: int, seed: int, buffer_size: int, total: int) -> Consumed:
    """`plan`'s consumed ids plus those its readers yielded in `batches_per_rank` batches per rank.

    Every rank's readers have the same batch counts, so worker w's readers of all ranks share a
    length and a consumed count: they are replayed together, in row blocks of bounded size."""
    before = plan.consumed
    words = (before or Consumed(total)).words.copy()  # `before` still maps positions to ids
    topology, micro = plan.topology, plan.topology.micro_batch
    rank_readers = readers(plan.steps, topology, 0)
    done = consumed_per_worker([r.batches for r in rank_readers], batches_per_rank)
    keys = ShuffleKeys.of(seed, plan.epoch, plan.segment)
    rank_span = plan.steps * micro
    for reader, batches in zip(rank_readers, done):
        if not batches:
            continue
        per_block = max(1, REPLAY_BLOCK_SLOTS // reader.length)
        for first_rank in range(0, topology.world_size, per_block):
            starts = reader.start + rank_span * np.arange(first_rank, min(first_rank + per_block, topology.world_size))
            taken = first_emitted(starts, reader.length, buffer_size, batches * micro, keys)
            taken &= starts[:, None] + np.arange(reader.length) < plan.num_samples  # padding holds no sample
            if before is None:  # ids are positions: each row's bits fall in its own window
                _mark_windows(words, starts, taken)
            else:
                row, slot = np.nonzero(taken)
                ids = before.nth_remaining(starts[row] + slot)
                np.bitwise_or.at(words, ids >> 6, np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64)))
    return Consumed(total, words)


def _mark_windows(words: np.ndarray, starts: np.ndarray, taken: np.ndarray) -> None:
    """Set bit starts[r] + k where taken[r, k]: each row is packed to words, shifted into place
    (rows start anywhere in a word) and merged. Windows of neighbouring rows may share a boundary
    word, so even and odd rows are merged in two passes (a fancy `|=` keeps one write per index)."""
    rows, length = taken.shape
    padded = np.zeros((rows, -(-length // 64) * 64), dtype=bool)
    padded[:, :length] = taken
    packed = np.packbits(padded, axis=1, bitorder="little").view(np.uint64)  # (R, W)
    shift = (starts % 64).astype(np.uint64)[:, None]
    placed = np.zeros((rows, packed.shape[1] + 1), dtype=np.uint64)
    placed[:, :-1] = packed << shift
    placed[:, 1:] |= (packed >> np.uint64(1)) >> (np.uint64(63) - shift)  # the bits carried over
    index = (starts // 64)[:, None] + np.arange(placed.shape[1])
    inside = index < len(words)
    for parity in (0, 1):
        rows_of = slice(parity, None, 2)
        words[index[rows_of][inside[rows_of]]] |= placed[rows_of][inside[rows_of]]
