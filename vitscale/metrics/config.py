"""Metrics section of the config tree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MetricsConfig:
    # Each rank serves Prometheus /metrics on port + local rank; 0 disables the HTTP server.
    port: int = 9400
    # Loopback unless the cluster's Prometheus must reach it from another host.
    address: str = "127.0.0.1"

    def validate(self) -> None:
        pass
