"""Surviving a cluster: stop requests, requeueing, hangs, and test-only fault injection.

- `StopRequests` (vitscale/signals.py, installed at the process's first line) turns SIGTERM
  (stop) and SIGUSR1 (Slurm's pre-emption warning: stop and requeue) into a flag; the loop
  all-reduces it at every step boundary, so a signal that reached one rank makes every rank save
  the same step and exit.
- `requeue_slurm_job()` runs `scontrol requeue <SLURM_JOB_ID>`, the id checked to be digits.
- `Watchdog` dumps every thread's stack and exits with EXIT_HUNG when no step finished for
  too long (a rank stuck in a collective whose timeout did not fire, a dead filesystem, ...).
- `maybe_inject(point, ...)` fires faults named in VITSCALE_INJECT_FAULT for the fault tests:
  `nan_loss@step=3,rank=1`, `sleep@step=3,rank=1,seconds=300`, `kill@point=checkpoint_write,step=4,rank=1`,
  `disk_full@step=4`. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

# Exit codes of the main job (also in the README).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2            # VitscaleError: config, data, checkpoint problems
EXIT_NONFINITE = 3            # too many consecutive NaN/inf steps
EXIT_HUNG = 4                 # watchdog or collective timeout
EXIT_CHECKPOINT_FAILED = 5    # the final / on-demand checkpoint could not be written
EXIT_STOPPED = 75             # stopped on request after saving (EX_TEMPFAIL: run again to resume)

from vitscale.signals import STOP_NONE, STOP_REQUEUE, STOP_TERM, StopRequests  # noqa: F401  (re-exported)


def requeue_slurm_job(environ: dict[str, str] | None = None) -> bool:
    """Ask Slurm to requeue this job; False (with a message) when not possible."""
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"\d{1,20}", job_id):
        print(f"vitscale: not requeueing: SLURM_JOB_ID={job_id!r} is not a job id (digits)", file=sys.stderr,
              flush=True)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"vitscale: scontrol requeue {job_id} failed: {error}", file=sys.stderr, flush=True)
        return False
    if result.returncode != 0:
        print(f"vitscale: scontrol requeue {job_id} failed: {result.stderr.strip()[:300]}", file=sys.stderr, flush=True)
        return False
    print(f"vitscale: requeued Slurm job {job_id}", flush=True)
    return True


class Watchdog:
    """A daemon thread: when `beat()` was not called for `seconds`, dump all stacks and exit."""

    def __init__(self, seconds: float, rank: int, exit_code: int = EXIT_HUNG):
        self.seconds, self.rank, self.exit_code = seconds, rank, exit_code
        self.last_beat = time.monotonic()
        self.paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitscale-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.seconds > 0:
            self._thread.start()
        return self

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = min(5.0, max(0.2, self.seconds / 10))
        while not self._stop.wait(interval):
            silent = time.monotonic() - self.last_beat
            if silent > self.seconds:
                print(f"vitscale: rank {self.rank}: no progress for {silent:.0f} s (engine.watchdog_seconds="
                      f"{self.seconds:g}); stacks of every thread follow, then exit {self.exit_code}",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(self.exit_code)  # a hung collective cannot be unwound; leave now


# ---------------------------------------------------------------------------------------------
# Test-only fault injection.

FAULT_ENV = "VITSCALE_INJECT_FAULT"


def _parse_faults(text: str) -> list[tuple[str, dict[str, str]]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, args = item.partition("@")
        params = dict(pair.split("=", 1) for pair in args.split(",") if "=" in pair)
        faults.append((kind.strip(), params))
    return faults


_context: dict[str, int] = {"step": -1, "rank": int(os.environ.get("RANK", "0") or 0)}
_thread = threading.local()  # a background checkpoint writer's own step (the save it belongs to)


def set_context(*, step: int | None = None, rank: int | None = None) -> None:
    if step is not None:
        _context["step"] = step
    if rank is not None:
        _context["rank"] = rank


def current_step() -> int:
    return getattr(_thread, "step", _context["step"])


@contextlib.contextmanager
def thread_step(step: int):
    """Within this block, this thread's faults fire at `step` (a background write of that step's save)."""
    previous = getattr(_thread, "step", None)
    _thread.step = step
    try:
        yield
    finally:
        if previous is None:
            del _thread.step
        else:
            _thread.step = previous


def maybe_inject(point: str, **details: Any) -> str | None:
    """Fire the fault configured for this point/step/rank, if any. Returns the kind fired for
    faults the caller acts on itself (nan_loss)."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    for kind, params in _parse_faults(text):
        if params.get("point", _DEFAULT_POINT.get(kind)) != point:
            continue
        if "step" in params and int(params["step"]) != current_step():
            continue
        if "rank" in params and int(params["rank"]) != _context["rank"]:
            continue
        if kind == "sleep":
            time.sleep(float(params.get("seconds", "3600")))
        elif kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "disk_full":
            import errno
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(details.get("path", "")))
        elif kind == "signal":
            os.kill(os.getpid(), getattr(signal, params.get("name", "SIGUSR1")))
        else:
            return kind
    return None


_DEFAULT_POINT = {"nan_loss": "loss", "sleep": "collective", "kill": "checkpoint_write",
                  "disk_full": "checkpoint_write", "signal": "step_start"}


def describe_exit(code: int) -> str:
    return {EXIT_OK: "finished", EXIT_NONFINITE: "too many consecutive non-finite steps",
            EXIT_HUNG: "hang detected", EXIT_CHECKPOINT_FAILED: "checkpoint could not be written",
            EXIT_STOPPED: "stopped on request after saving a checkpoint"}.get(code, f"exit {code}")
