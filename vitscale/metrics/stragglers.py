"""Straggler detection over per-rank times gathered by rank 0.

Each rank reports its *own* time per step, the part no other rank can cause: its forward compute
(training forwards hold no collective under ZeRO-0/1/2 and the local engine) and its wait for
input. Step times cannot show a straggler: every rank waits for the slowest one in the gradient
reduction, so all step times come out equal.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Straggler:
    rank: int
    compute_seconds: float
    data_wait_seconds: float
    median_seconds: float      # median own time over the ranks

    @property
    def own_seconds(self) -> float:
        return self.compute_seconds + self.data_wait_seconds

    @property
    def ratio(self) -> float:
        return self.own_seconds / self.median_seconds

    @property
    def input_bound(self) -> bool:
        # The rank spent most of its extra time waiting for its input pipeline.
        return self.data_wait_seconds > 0.5 * (self.own_seconds - self.median_seconds)

    def message(self) -> str:
        cause = ("input-bound: its data loader is slow (more data.num_workers, faster storage)"
                 if self.input_bound else "compute-bound: check that node's GPU (clocks, thermals, other jobs)")
        return (f"straggler: rank {self.rank} takes {self.own_seconds:.3f} s of its own per step (forward "
                f"{self.compute_seconds:.3f} s, data wait {self.data_wait_seconds:.3f} s), {self.ratio:.2f}x "
                f"the median {self.median_seconds:.3f} s; {cause}")


def own_times(compute_seconds: list[float], data_wait_seconds: list[float]) -> list[float]:
    if len(compute_seconds) != len(data_wait_seconds):
        raise ValueError("compute_seconds and data_wait_seconds need one entry per rank each")
    return [c + w for c, w in zip(compute_seconds, data_wait_seconds)]


def find_stragglers(compute_seconds: list[float], data_wait_seconds: list[float],
                    factor: float) -> list[Straggler]:
    """Ranks whose own time (compute + data wait) exceeds factor x the median over all ranks."""
    own = own_times(compute_seconds, data_wait_seconds)
    if len(own) < 2:
        return []
    median = statistics.median(own)
    if median <= 0:
        return []
    return [Straggler(rank, compute, wait, median)
            for rank, (compute, wait, mine) in enumerate(zip(compute_seconds, data_wait_seconds, own))
            if mine > factor * median]
