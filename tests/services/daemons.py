"""Real Slurm and Prometheus servers on 127.0.0.1 for the tests, via this folder's scripts.

    with slurm_cluster() as slurm:
        job = slurm.sbatch(["--nodes=1", "launch/pretrain_vit_h14.sh"], env=...)
        slurm.wait_until_gone(job, timeout=120)

Each context manager installs the Debian packages when missing (root + apt), starts the daemons
in a fresh temp dir with free ports, and always stops them again, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

SERVICES = Path(__file__).resolve().parent
REPO = SERVICES.parents[1]


def free_port(count: int = 1) -> int:
    """A base port p with p .. p + count - 1 all free on loopback."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for offset in range(count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 600) -> None:
    result = subprocess.run(["bash", str(SERVICES / script), *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def kill_leftovers(state: Path) -> None:
    """Last resort when a `down` failed: SIGKILL the daemons whose PIDs the scripts saved."""
    for pid_file in state.glob("*.bgpid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def shared_temp_dir(prefix: str) -> Path:
    # munged runs as user munge and Prometheus may too: the dir must be traversable by others.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def daemons_up(script: str, state: Path, env: dict, down_timeout: float):
    """`SCRIPT up STATE`; afterwards always `SCRIPT down STATE`, SIGKILL leftovers, remove STATE."""
    try:
        run_script(script, "up", str(state), env=env, timeout=120)
        yield
    finally:
        try:
            run_script(script, "down", str(state), env=env, timeout=down_timeout)
        finally:
            kill_leftovers(state)
            shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Slurm.


class SlurmCluster:
    def __init__(self, state: Path, login_host=None):
        self.state, self.login_host = state, login_host  # clients run on login_host (a test host) if given
        self.env = dict(os.environ, SLURM_CONF=str(state / "etc" / "slurm.conf"))

    def command(self, *args: str, env: dict | None = None, cwd: str | Path | None = None,
                check: bool = True) -> str:
        argv = self.login_host.command(list(args), cwd) if self.login_host else list(args)
        result = subprocess.run(argv, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, args: list[str], *, env: dict | None = None, cwd: str | Path | None = None) -> str:
        out = self.command("sbatch", "--parsable", *args, env=dict(self.env, **(env or {})), cwd=cwd)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCount, ExitCode, ...); {} once purged."""
        out = self.command("scontrol", "show", "job", "-o", job_id, check=False)
        fields = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_for(self, job_id: str, condition, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if condition(info):
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id}: not {what} after {timeout:.0f} s: {self.job(job_id)}\n{self.logs()}")

    def wait_until_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        return self.wait_for(job_id, lambda info: info.get("JobState") in finished, timeout, "finished")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.state / "log").glob("slurm*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


@contextlib.contextmanager
def slurm_cluster(hosts=None):
    """One node on loopback, or one node per test host (services/hosts.py; the first runs
    slurmctld and the client commands)."""
    run_script("slurm.sh", "install")
    state = shared_temp_dir("vitscale-slurm-")
    ports = free_port(2)
    env = dict(os.environ, SLURM_CTLD_PORT=str(ports), SLURMD_PORT=str(ports + 1))
    if hosts:
        env["SLURM_HOSTS"] = " ".join(f"{host.name}={host.address}:{host.init_pid}" for host in hosts)
    with daemons_up("slurm.sh", state, env, down_timeout=120):
        yield SlurmCluster(state, login_host=hosts[0] if hosts else None)


# ---------------------------------------------------------------------------------------------
# Prometheus.


class PrometheusServer:
    def __init__(self, state: Path, port: int):
        self.state, self.port = state, port
        self.targets_dir = state / "targets"
        self.url = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Instant query: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        return self.api("query", query=promql)["result"]

    def active_targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def log(self) -> str:
        path = self.state / "prometheus.log"
        return "\n".join(path.read_text().splitlines()[-15:]) if path.exists() else ""


def derived_prometheus_config(state: Path) -> Path:
    """docker/prometheus/prometheus.yml (and its alert rules) pointed at STATE/targets, 1 s intervals."""
    import yaml

    shipped = REPO / "docker" / "prometheus"
    config = yaml.safe_load((shipped / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(shipped / name) for name in config.get("rule_files", [])]
    config.pop("alerting", None)  # no Alertmanager here; its config is checked with amtool
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "vitscale"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    for discovery in job["file_sd_configs"]:
        discovery.update(files=[str(state / "targets" / "*.json")], refresh_interval="1s")
    path = state / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def prometheus_server():
    run_script("prometheus.sh", "install")
    state = shared_temp_dir("vitscale-prometheus-")
    derived_prometheus_config(state)
    port = free_port()
    env = dict(os.environ, PROMETHEUS_PORT=str(port))
    with daemons_up("prometheus.sh", state, env, down_timeout=60):
        yield PrometheusServer(state, port)
