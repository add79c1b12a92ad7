"""Talking to the other ranks: where this process sits, starting the process group, and the one
device-aware helper every control-plane collective goes through.

    launch = Launch.from_environment()
    comm = start_process_group(config, launch)          # None group for one process
    stop, skipped = comm.host_reduce([stop_flag, skipped_flag], "max")   # floats on every rank
    flag = comm.device_any(nonfinite)                   # stays on the device, no host sync

Control-plane values (stop requests, non-finite flags, loss sums, rank times, checkpoint
verdicts, evaluation counts) are tiny, but a process group whose backend is NCCL has no backend
for CPU tensors, so every such tensor is built on `comm.device`: the accelerator under NCCL,
the CPU under gloo. The group is started with one backend per device type ("cpu:gloo,cuda:nccl"
on GPUs), so CPU tensors a library reduces on its own still have a backend. Nothing outside
vitscale/engine/ calls torch.distributed; a test enforces it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Sequence

import torch

from vitscale.engine import faults
from vitscale.errors import VitscaleError

ReduceOp = Literal["sum", "max", "min"]


@dataclass(frozen=True)
class Launch:
    """Where this process sits, from the launcher's environment (torchrun, deepspeed, srun)."""

    rank: int
    local_rank: int
    world_size: int
    job_id: str

    @staticmethod
    def from_environment(local_rank_arg: int | None = None) -> "Launch":
        env = os.environ
        if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
            # srun started the ranks directly (no torchrun): translate Slurm's variables.
            env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_NTASKS", "1")
            env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        return Launch(rank=int(env.get("RANK", "0")), local_rank=local, world_size=int(env.get("WORLD_SIZE", "1")),
                      job_id=env.get("SLURM_JOB_ID", ""))


class Communicator:
    """Collectives of small control values, on the device the group's backend accepts.

    `host_reduce` is the only call that reads a result back to the host (one transfer for all
    values); `device_any` leaves its result on the device for the caller to use without a sync.
    With no process group (one process), both reduce over this rank alone."""

    def __init__(self, device: torch.device, world_size: int, distributed: bool):
        self.device, self.world_size, self.distributed = device, world_size, distributed

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            faults.maybe_inject("collective")
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                        "min": dist.ReduceOp.MIN}[op])
        return tensor

    def stack(self, values: Sequence[float | bool | torch.Tensor]) -> torch.Tensor:
        """One float64 vector on the control device; device scalars are not read to the host."""
        parts = [value.detach().reshape(()).to(self.device, torch.float64) if isinstance(value, torch.Tensor)
                 else torch.tensor(float(value), dtype=torch.float64, device=self.device) for value in values]
        return torch.stack(parts)

    def host_reduce(self, values: Sequence[float | bool | torch.Tensor], op: ReduceOp = "sum") -> list[float]:
        """Reduce each value over every rank; the results on the host (one device->host copy)."""
        return self._all_reduce(self.stack(values), op).tolist()

    def device_any(self, flag: torch.Tensor) -> torch.Tensor:
        """True on every rank if `flag` is true on any rank; a bool scalar on the control device."""
        return self._all_reduce(flag.detach().reshape(()).to(self.device, torch.float32), "max") > 0

    def device_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a scalar, on the control device: no host read."""
        return self._all_reduce(value.detach().reshape(()).to(self.device, torch.float32), "sum")

    def all_gather(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's `values`, indexed by rank (rank times for the straggler view)."""
        mine = self.stack(values)
        if not self.distributed:
            return [mine.tolist()]
        import torch.distributed as dist

        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        return torch.stack(every).tolist()

    def barrier(self) -> None:
        """Every rank reaches this point (an all-reduce on the control device: a gloo barrier
        would use CPU tensors, an NCCL one would guess the device)."""
        if self.distributed:
            self._all_reduce(torch.zeros(1, device=self.device), "sum").tolist()

    def new_background_group(self):
        """A second gloo group over every rank (None without a process group), for collectives
        a background thread runs while the loop goes on using the main group: DCP's asynchronous
        save. Two threads must never share a group (their collectives would pair up wrongly).
        Every rank makes this call at the same point."""
        if not self.distributed:
            return None
        import torch.distributed as dist

        return dist.new_group(backend="gloo")  # engine.collective_timeout_seconds (apply_timeout_to_new_groups)

    def all_gather_object(self, value) -> list:
        """Every rank's `value` (picklable), indexed by rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        every: list = [None] * self.world_size
        dist.all_gather_object(every, value)
        return every

    def broadcast_object(self, value, src: int = 0):
        """`value` of rank `src` on every rank (plain Python objects: paths, verdict texts)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]


def is_collective_failure(error: BaseException) -> bool:
    """A peer died, hung past the timeout, or the store went away: torch's typed errors, or
    (gloo raises a plain RuntimeError) an error raised from inside a c10d collective call."""
    import torch.distributed as dist

    typed = tuple(getattr(dist, name) for name in ("DistError", "DistBackendError", "DistNetworkError",
                                                   "DistStoreError") if hasattr(dist, name))
    if isinstance(error, typed):
        return True
    if not isinstance(error, RuntimeError):
        return False
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.endswith(os.path.join("distributed", "distributed_c10d.py")):
            return True
        frame = frame.tb_next
    return False


def accelerator_device(local_rank: int) -> torch.device:
    """The device this rank trains on: its GPU when there is one, else the CPU."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_process_group(config, launch: Launch) -> Communicator:
    """The process group for every engine, with engine.collective_timeout_seconds; one process
    without a launcher gets no group (the local engine) unless the engine needs one."""
    import torch.distributed as dist

    device = accelerator_device(launch.local_rank)
    needs_group = launch.world_size > 1 or config.engine.kind == "deepspeed"
    if not needs_group:
        return Communicator(device, 1, distributed=False)
    if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    check_gloo_reachable(launch.world_size)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=config.engine.collective_timeout_seconds)
    # DeepSpeed adopts a group that already exists, so every engine starts it the same way.
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    apply_timeout_to_new_groups(timeout)
    return Communicator(device, launch.world_size, distributed=True)


def node_count(world_size: int, env=os.environ) -> int | None:
    """Nodes in the job, from the launcher's variables (torchrun, deepspeed, srun); None: unknown."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun's, the deepspeed launcher's
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return -(-world_size // int(env[key]))
    for key in ("CROSS_SIZE", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return None


def gloo_address(hostname: str) -> str | None:
    """The address gloo binds and advertises without GLOO_SOCKET_IFNAME: the first address of this
    host's name that can be bound (ProcessGroupGloo's default device), or None if there is none
    (gloo then falls back to 127.0.0.1)."""
    try:
        candidates = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for family, kind, proto, _, address in candidates:
        with contextlib.suppress(OSError), socket.socket(family, kind, proto) as probe:
            probe.bind((address[0], 0))
            return address[0]
    return None


def check_gloo_reachable(world_size: int, env=os.environ) -> None:
    """Refuse, before any rendezvous, a job on several nodes whose gloo would advertise a loopback
    address: ranks on the other nodes would get 'connection refused' while this node's ranks wait
    out engine.collective_timeout_seconds. Debian and Ubuntu map the hostname to 127.0.1.1."""
    nodes = node_count(world_size, env)
    if nodes is None or nodes < 2 or env.get("GLOO_SOCKET_IFNAME"):
        return
    hostname = socket.gethostname()
    address = gloo_address(hostname)
    if address is None or ipaddress.ip_address(address.split("%")[0]).is_loopback:
        resolved = f"resolves to {address}, a loopback address" if address else "does not resolve to an address"
        raise VitscaleError(f"this node's hostname {hostname!r} {resolved}, so ranks on the other {nodes - 1} "
                            "node(s) cannot reach it (set VITSCALE_SOCKET_IFNAME=<the cluster interface, e.g. ib0> for "
                            "launch/torchrun.sh or launch/pretrain_vit_h14.sh, or GLOO_SOCKET_IFNAME and "
                            "NCCL_SOCKET_IFNAME yourself, or map the hostname to its cluster address in /etc/hosts)")


def apply_timeout_to_new_groups(timeout: timedelta) -> None:
    """Groups made later without a timeout (DeepSpeed's ZeRO and data-parallel groups are made
    with `new_group(ranks)`) get torch's backend default, 30 min for gloo and 10 for NCCL, not the
    world group's: a stopped rank would hold the job that long. torch reads those defaults from
    two module globals when a group is made, so they are set to engine.collective_timeout_seconds."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def stop_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
