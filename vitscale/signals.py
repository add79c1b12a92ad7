"""Stop requests from the first line of the training process (standard library only).

    stops = install_early()            # vitscale/train.py's first statement, before torch loads
    stops.requested                    # STOP_NONE | STOP_TERM | STOP_REQUEUE, read at step boundaries

SIGTERM (scancel, the job's time limit, pre-emption) asks for a stop; SIGUSR1 (Slurm's warning
before the time limit, `scancel --signal=USR1`) asks for a stop and a requeue. The handlers only
record the request: the loop agrees on it with every rank at the next step boundary, every rank
saves the same step, and the job exits 75. Installed before the heavy imports, so a signal that
arrives while torch, DeepSpeed and the shard checks load is kept, not fatal. DataLoader workers
ignore both (`ignore_in_worker`): Slurm signals every process of a job step, and a worker that
died of it would take the rank down before it saves.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_NONE, STOP_TERM, STOP_REQUEUE = 0, 1, 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Signal handlers that only record the request; the loop acts at a step boundary."""

    def __init__(self) -> None:
        self.requested = STOP_NONE
        self.signal_name = ""

    def install(self) -> "StopRequests":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        kind = STOP_REQUEUE if signum == signal.SIGUSR1 else STOP_TERM
        self.requested = max(self.requested, kind)
        self.signal_name = signal.Signals(signum).name


_process_requests: StopRequests | None = None


def install_early() -> StopRequests:
    """This process's StopRequests, installed on the first call (later calls return it)."""
    global _process_requests
    if _process_requests is None:
        _process_requests = StopRequests().install()
    return _process_requests


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: stop signals are the main process's to act on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
