"""Metrics section of the config tree."""

from __future__ import annotations

from dataclasses import dataclass

from vitscale.errors import ConfigError


@dataclass
class MetricsConfig:
    # Each rank serves Prometheus /metrics on port + local rank; 0 disables the HTTP server.
    port: int = 9400
    # Loopback unless the cluster's Prometheus must reach it from another host ("0.0.0.0": all).
    address: str = "127.0.0.1"
    # Rank 0 writes Prometheus file_sd target files for all ranks here (a directory the cluster's
    # Prometheus watches with file_sd_configs); None writes none. Removed again at exit.
    file_sd_dir: str | None = None
    # Host name written into the target files; None: the bind address, or this node's host name
    # when binding all interfaces.
    advertise_host: str | None = None
    # Rank 0 warns when one rank's step time exceeds the median over ranks by this factor.
    straggler_factor: float = 1.5

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("metrics.port", f"{self.port} is not a TCP port",
                              "use 1..65535, or 0 to disable the /metrics server")
        if not self.address.strip():
            raise ConfigError("metrics.address", "is empty", "use 127.0.0.1, or 0.0.0.0 for all interfaces")
        if self.file_sd_dir is not None and not self.file_sd_dir.strip():
            raise ConfigError("metrics.file_sd_dir", "is empty", "name a directory, or null to write no targets")
        if self.straggler_factor <= 1.0:
            raise ConfigError("metrics.straggler_factor", f"must be > 1, got {self.straggler_factor}",
                              "use e.g. 1.5 (warn when a rank is 50% slower than the median)")
