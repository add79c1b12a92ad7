"""The epoch plan against plain references: the vectorised shuffle buffer against a step-by-step
simulation of a streaming buffer, the consumed-id bitmap against a Python set, and a topology-
change replay against brute force over every reader."""

from __future__ import annotations

import numpy as np
import pytest

from vitscale.data import plan as planning


def simulated_buffer(start: int, length: int, buffer_size: int, keys) -> np.ndarray:
    """A streaming shuffle buffer, one slot at a time, drawing what the plan draws."""
    size = max(1, min(buffer_size, length))
    if size == 1:
        return np.arange(length)
    draws = planning.uniform(keys.picks, np.arange(start, start + length - size))
    picks = [min(int(u * size), size - 1) for u in draws]
    buffer, emitted = list(range(size)), []
    for step, pick in enumerate(picks):
        emitted.append(buffer[pick])
        buffer[pick] = size + step
    drain_keys = planning.uniform(keys.drain, np.arange(start, start + size))
    return np.array(emitted + [buffer[i] for i in np.argsort(drain_keys, kind="stable")])


@pytest.mark.parametrize("length,buffer_size", [(1, 5), (7, 1), (10, 3), (64, 64), (65, 64), (1000, 37)])
def test_buffer_order_equals_a_step_by_step_buffer(length, buffer_size):
    for start, keys in [(0, planning.ShuffleKeys.of(0, 0, 0)), (12345, planning.ShuffleKeys.of(3, 1, 7))]:
        got = planning.buffer_shuffle_order(start, length, buffer_size, keys)
        np.testing.assert_array_equal(got, simulated_buffer(start, length, buffer_size, keys))
        assert sorted(got.tolist()) == list(range(length))
        for count in {0, 1, length // 2, max(0, length - buffer_size), length - 1, length}:
            mask = planning.first_emitted(np.array([start, start]), length, buffer_size, count, keys)
            assert np.flatnonzero(mask[0]).tolist() == sorted(got[:count].tolist())


def test_counter_draws_are_uniform():
    draws = planning.uniform(planning.stream_key(1, 2), np.arange(200_000))
    counts, _ = np.histogram(draws, bins=20, range=(0, 1))
    assert draws.min() >= 0 and draws.max() < 1 and abs(counts / 10_000 - 1).max() < 0.05


def test_consumed_bitmap_equals_a_set():
    rng = np.random.default_rng(0)
    total = 1000
    taken: set[int] = set()
    consumed = planning.Consumed(total)
    for _ in range(3):
        remaining = np.array(sorted(set(range(total)) - taken))
        pick = np.sort(rng.choice(remaining, size=len(remaining) // 3, replace=False))
        words = consumed.words.copy()
        bits = np.zeros(len(words) * 64, dtype=bool)
        bits[pick] = True
        words |= np.packbits(bits, bitorder="little").view(np.uint64)
        consumed = planning.Consumed(total, words)
        taken |= set(pick.tolist())
        remaining = np.array(sorted(set(range(total)) - taken))
        assert consumed.remaining == len(remaining)
        positions = rng.integers(0, len(remaining), size=50)
        np.testing.assert_array_equal(consumed.nth_remaining(positions), remaining[positions])
        first, last = sorted(rng.integers(0, len(remaining), size=2))
        np.testing.assert_array_equal(consumed.remaining_between(first, last), remaining[first:last + 1])


def brute_force_unseen(total, segments, topologies, seed, buffer_size):
    """Position lists of every reader, replayed with Python sets."""
    remaining = list(range(total))
    for segment, (topology, batches) in enumerate(zip(topologies, segments)):
        steps = planning.steps_for(len(remaining), topology)
        seen = set()
        for rank in range(topology.world_size):
            rank_readers = planning.readers(steps, topology, rank)
            done = planning.consumed_per_worker([r.batches for r in rank_readers], batches)
            for reader, count in zip(rank_readers, done):
                keys = planning.ShuffleKeys.of(seed, 0, segment)
                order = simulated_buffer(reader.start, reader.length, buffer_size, keys)
                for position in reader.start + order[: count * topology.micro_batch]:
                    if position < len(remaining):
                        seen.add(remaining[position])
        remaining = [i for i in remaining if i not in seen]
    return remaining


@pytest.mark.parametrize("buffer_size", [1, 23, 70, 5000])  # streaming phase, drain phase, whole slice
def test_topology_change_replay_equals_brute_force(buffer_size):
    topologies = [planning.Topology(4, 3, 5), planning.Topology(3, 2, 4), planning.Topology(2, 1, 7)]
    history = [{**t.to_dict(), "batches": b} for t, b in zip(topologies[:2], (4, 3))]
    plan = planning.plan_epoch(997, epoch=0, topology=topologies[2], seed=5, buffer_size=buffer_size,
                               history=history)
    expected = brute_force_unseen(997, (4, 3), topologies[:2], 5, buffer_size)
    assert plan.num_samples == len(expected)
    ids = np.concatenate([plan.reader_ids(r) for rank in range(2)
                          for r in planning.readers(plan.steps, topologies[2], rank)])
    np.testing.assert_array_equal(ids[ids >= 0], expected)
    assert (ids < 0).sum() == plan.steps * 2 * 7 - len(expected)  # padding only at the end


def test_closed_form_worker_counts_equal_the_round_robin():
    rng = np.random.default_rng(1)
    for _ in range(200):
        counts = rng.integers(0, 6, size=int(rng.integers(1, 6))).tolist()
        order = planning.interleave(counts)
        for yielded in range(len(order) + 1):
            expected = [0] * len(counts)
            for worker, _ in order[:yielded]:
                expected[worker] += 1
            assert planning.consumed_per_worker(counts, yielded) == expected
            assert planning.next_worker(counts, yielded) == (order[yielded][0] if yielded < len(order) else 0)
