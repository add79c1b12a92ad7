"""Test hosts: each a network, UTS, mount and PID namespace of this machine, joined by a veth pair.

    with two_hosts(tmp_path) as (host0, host1):
        launcher = host0.popen(["bash", "launch/torchrun.sh", ...], env=..., stdout=...)
        host1.power_off()                         # every process of host1 dies at once

Each host has its own hostname (host0, host1), loopback, and one interface `veth0` with address
10.77.0.1 or 10.77.0.2, the two ends of one veth pair: only the hosts can reach each other. Its
/etc/hosts is the layout Debian installs: the host's own name resolves to 127.0.1.1 (so a process that advertises the
address of its hostname, as gloo does by default, is unreachable from the other hosts: the trap
GLOO_SOCKET_IFNAME exists for), the other hosts' names to their addresses. The filesystem is the
machine's own, as a cluster's shared filesystem.

Nothing can leak: a host is the PID 1 of its PID namespace, and the kernel kills every process of
a PID namespace when its PID 1 dies. PID 1 dies with the `unshare` that made it (--kill-child),
and that `unshare` with the test process (PR_SET_PDEATHSIG), even when pytest is killed -9.
The network namespace and its veth end go with the host's last process. Needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

INTERFACE = "veth0"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _first_child(parent: subprocess.Popen, what: str) -> int:
    """The PID of the process `parent` (unshare, nsenter) forked, once it has."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
            if children:
                return int(children[0])
        if parent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} is gone (exit {parent.poll()})")
        time.sleep(0.02)


def can_make_hosts() -> str:
    """Why test hosts cannot be made here, or '' when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed" if missing else ""


class Host:
    def __init__(self, index: int, holder: subprocess.Popen, init_pid: int):
        self.index, self.name, self.address = index, f"host{index}", f"10.77.0.{index + 1}"
        self.holder, self.init_pid = holder, init_pid

    def command(self, argv: list[str], cwd: Path | str | None = None) -> list[str]:
        """argv run inside this host (its processes see the host's PIDs, hostname and network)."""
        enter = ["nsenter", f"--target={self.init_pid}", "--net", "--uts", "--mount", "--pid"]
        if cwd is not None:
            enter.append(f"--wd={cwd}")
        return [*enter, "--", *argv]

    def run(self, argv: list[str], cwd: Path | str | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv, cwd), cwd=cwd, **kwargs)

    def popen(self, argv: list[str], cwd: Path | str | None = None, **kwargs) -> "HostProcess":
        return HostProcess(subprocess.Popen(self.command(argv, cwd), cwd=cwd, **kwargs))

    def power_off(self) -> None:
        """Every process of this host killed at the same instant; its network goes with them."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGKILL)
        self.holder.wait(timeout=30)


class HostProcess:
    """A process started in a host: `nsenter` forks it and waits for it, so signals for the
    process itself go to nsenter's child; the exit status is the child's."""

    def __init__(self, nsenter: subprocess.Popen):
        self.nsenter = nsenter

    @property
    def pid(self) -> int:
        """The process's PID as this machine sees it."""
        return _first_child(self.nsenter, "the process in the test host")

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def poll(self) -> int | None:
        return self.nsenter.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.nsenter.wait(timeout=timeout)


@contextlib.contextmanager
def two_hosts(state_dir: Path):
    """Two hosts joined by a veth pair; removed on every exit path."""
    reason = can_make_hosts()
    if reason:
        raise RuntimeError(f"cannot make test hosts: {reason}")
    state_dir.mkdir(parents=True, exist_ok=True)
    hosts: list[Host] = []
    try:
        for index in range(2):
            hosts_file = state_dir / f"hosts.host{index}"
            hosts_file.write_text("127.0.0.1 localhost\n" f"127.0.1.1 host{index}\n" + "".join(
                f"10.77.0.{other + 1} host{other}\n" for other in range(2) if other != index))
            # A sysfs of the host's own network namespace (/sys/class/net lists its interfaces),
            # with the machine's cgroup tree kept below it (slurmd needs /sys/fs/cgroup).
            cgroups, ready = state_dir / f"cgroup.host{index}", state_dir / f"ready.host{index}"
            cgroups.mkdir(exist_ok=True)
            setup = (f"hostname host{index} && mount --bind {hosts_file} /etc/hosts"
                     f" && mount --rbind /sys/fs/cgroup {cgroups} && mount -t sysfs sysfs /sys"
                     f" && mount --rbind {cgroups} /sys/fs/cgroup && umount -l {cgroups}"
                     f" && ip link set lo up && touch {ready} && exec sleep infinity")
            errors = state_dir / f"host{index}.err"
            holder = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc",
                                       "--kill-child", "sh", "-c", setup], preexec_fn=_die_with_parent,
                                      stdout=subprocess.DEVNULL, stderr=errors.open("w"))
            hosts.append(Host(index, holder, _first_child(holder, f"unshare for host{index}")))
            deadline = time.monotonic() + 10
            while not ready.exists():
                if holder.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"host{index} did not come up: {errors.read_text()}")
                time.sleep(0.02)
        _link(*hosts)
        yield hosts
    finally:
        for host in hosts:
            host.power_off()


def _link(first: Host, second: Host) -> None:
    """A veth pair between the two hosts, named `veth0` inside each."""
    ends = (f"vs{os.getpid() % 100000}h{first.index}", f"vs{os.getpid() % 100000}h{second.index}")
    subprocess.run(["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], check=True)
    for end, host in zip(ends, (first, second)):
        subprocess.run(["ip", "link", "set", end, "netns", str(host.init_pid)], check=True)
        host.run(["sh", "-c", f"ip link set {end} name {INTERFACE} && ip addr add {host.address}/24 dev {INTERFACE}"
                  f" && ip link set {INTERFACE} up"], check=True, capture_output=True)

