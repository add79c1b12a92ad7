"""Prometheus file-based service discovery: the target file rank 0 writes for its job.

A cluster's Prometheus that watches a directory with

    scrape_configs:
      - job_name: vitscale
        file_sd_configs: [{files: ["/shared/prometheus/targets/*.json"]}]

finds every rank of every running job without a config edit or reload. The file is replaced
atomically (write + rename in the same directory), so Prometheus never reads half a file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path

WILDCARD_ADDRESSES = ("0.0.0.0", "::", "[::]", "")


def target_file_path(directory: str | Path, job_id: str, run_name: str) -> Path:
    """One file per job and run; only [A-Za-z0-9._-] survive so a job id cannot escape the dir."""
    stem = f"vitscale_{job_id or 'local'}_{run_name}"
    return Path(directory) / (re.sub(r"[^A-Za-z0-9._-]", "_", stem) + ".json")


def advertised_host(bind_address: str, advertise_host: str | None) -> str:
    """The host Prometheus should scrape: explicit, else the bind address, else this node's name."""
    if advertise_host:
        return advertise_host
    if bind_address in WILDCARD_ADDRESSES:
        return socket.gethostname()  # getfqdn may wait on DNS
    return bind_address


def format_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def target_groups(targets: list[str], labels: dict[str, str]) -> list[dict]:
    """file_sd JSON: a list of {targets, labels} groups; one group holds the whole job."""
    return [{"targets": sorted(targets), "labels": dict(labels)}]


def write_target_file(path: Path, groups: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp in the same directory so the rename is atomic; ".tmp" keeps it out of "*.json" globs.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(groups, handle, indent=1)
            handle.write("\n")
        os.chmod(tmp, 0o644)  # Prometheus often runs as its own user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_target_file(path: Path) -> None:
    path.unlink(missing_ok=True)
