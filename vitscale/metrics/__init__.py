"""Prometheus metrics of training runs and the `vitscale report` plots (imported on first use:
`vitscale.metrics.config` loads without prometheus_client)."""

import importlib

_LAZY = {"MetricsConfig": "vitscale.metrics.config", "TrainingMetrics": "vitscale.metrics.training"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vitscale.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
