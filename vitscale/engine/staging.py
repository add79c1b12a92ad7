"""Background checkpoint writes: the step waits only while the state is copied to host memory;
the files are written, fsync'd and renamed by a thread while training goes on.

    stager = HostStager(pin=device.type == "cuda")
    staged = stager.stage(state_dict, key="zero_pp_rank_0_mp_rank_00_optim_states.pt")
    future = BackgroundWriter().submit(write_them, staged)   # resolves once the files are on disk

`HostStager.stage` copies every tensor of a nested state (DeepSpeed's state dicts) into host
memory, pinned when the source is on an accelerator, and keeps storage sharing as it is: views
of one buffer stay views of one copied buffer, tensor subclasses (nn.Parameter) and container
types are kept, so torch.save writes the bytes a synchronous save of the same state writes (on
a GPU the files record "cpu" as the storage location, which every load maps to anyway). The
host buffers are kept and reused by the next save of the same structure: one copy of this
rank's state stays in host memory between saves, and a save allocates (and pins) nothing new.
At most one save is in flight, so a buffer is never overwritten while it is being written.
"""

from __future__ import annotations

import copy
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch


class HostStager:
    def __init__(self, pin: bool):
        self.pin = pin
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def stage(self, state: Any, key: str) -> Any:
        """A copy of `state` whose tensors live in host memory; `key` names the file it is for
        (buffers are reused per file and per storage)."""
        memo: dict[int, Any] = {}
        copies: dict[int, torch.UntypedStorage] = {}  # source StorageImpl -> its host copy
        for tensor in _tensors(state):
            if id(tensor) not in memo:
                memo[id(tensor)] = self._stage_tensor(tensor, copies, key)
        staged = copy.deepcopy(state, memo)  # containers and plain objects; tensors come from memo
        if self.pin and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the non_blocking device->host copies landed
        return staged

    def _stage_tensor(self, tensor: torch.Tensor, copies: dict[int, torch.UntypedStorage], key: str) -> torch.Tensor:
        storage = tensor.untyped_storage()
        host = copies.get(storage._cdata)
        if host is None:
            buffer = self._buffer(key, len(copies), storage.nbytes())
            source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            buffer.copy_(source, non_blocking=self.pin)
            host = copies[storage._cdata] = buffer.untyped_storage()
        plain = torch.empty(0, dtype=tensor.dtype).set_(host, tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(plain, requires_grad=tensor.requires_grad)
        return plain.requires_grad_(tensor.requires_grad)

    def _buffer(self, key: str, index: int, nbytes: int) -> torch.Tensor:
        buffer = self._buffers.get((key, index))
        if buffer is None or buffer.numel() != nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin and torch.cuda.is_available())
            self._buffers[(key, index)] = buffer
        return buffer


def _tensors(state: Any):
    """Tensors inside dicts, lists and tuples (where DeepSpeed puts them); tensors held by other
    objects are deep-copied where they are, which is correct, only not host-staged."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


class BackgroundWriter:
    """One thread that writes checkpoints, jobs in order. A job returns the failure as text
    (None: written); an exception it raises becomes its failure text, so the future always
    resolves to a verdict the ranks can agree on. The job sees the fault-injection step of the
    save it belongs to (the loop has moved on by the time it runs)."""

    def __init__(self, name: str = "vitscale-checkpoint"):
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], str | None]) -> Future:
        from vitscale.engine import faults

        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        return self._executor.submit(_guarded, job, faults.current_step())


def _guarded(job: Callable[[], str | None], step: int) -> str | None:
    from vitscale.engine import faults

    with faults.thread_step(step):
        return run_guarded(job)


def run_guarded(job: Callable[[], str | None]) -> str | None:
    """job(), with an exception turned into its failure text: a write error (full disk: OSError,
    or RuntimeError from torch.save) is the save's verdict, agreed by the ranks; anything else is
    a bug, whose traceback is printed too."""
    try:
        return job()
    except Exception as error:  # noqa: BLE001 - see above
        if not isinstance(error, (OSError, RuntimeError)):
            traceback.print_exc()
        return first_line(error)


def first_line(error: BaseException) -> str:
    text = str(getattr(error, "strerror", None) or error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def resolved(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
