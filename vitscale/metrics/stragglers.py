"""Straggler detection over per-rank step times gathered by rank 0."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Straggler:
    rank: int
    step_seconds: float
    median_seconds: float
    data_wait_seconds: float

    @property
    def ratio(self) -> float:
        return self.step_seconds / self.median_seconds

    @property
    def input_bound(self) -> bool:
        # The rank spent most of its extra time waiting for its input pipeline.
        return self.data_wait_seconds > 0.5 * (self.step_seconds - self.median_seconds)

    def message(self) -> str:
        cause = ("input-bound: its data loader is slow (more data.num_workers, faster storage)"
                 if self.input_bound else "compute- or network-bound: check that node's GPU and links")
        return (f"straggler: rank {self.rank} step time {self.step_seconds:.3f} s is {self.ratio:.2f}x "
                f"the median {self.median_seconds:.3f} s (data wait {self.data_wait_seconds:.3f} s); "
                f"{cause}")


def find_stragglers(step_seconds: list[float], data_wait_seconds: list[float],
                    factor: float) -> list[Straggler]:
    """Ranks whose step time exceeds factor x the median over all ranks."""
    if len(step_seconds) != len(data_wait_seconds):
        raise ValueError("step_seconds and data_wait_seconds need one entry per rank each")
    if len(step_seconds) < 2:
        return []
    median = statistics.median(step_seconds)
    if median <= 0:
        return []
    return [Straggler(rank, seconds, median, wait)
            for rank, (seconds, wait) in enumerate(zip(step_seconds, data_wait_seconds))
            if seconds > factor * median]
