"""Prometheus metrics of training runs and the `vitscale report` plots (imported on first use:
`vitscale.metrics.config` loads without prometheus_client)."""

from vitscale.lazy import lazy_attributes

_LAZY = {"MetricsConfig": "vitscale.metrics.config", "TrainingMetrics": "vitscale.metrics.training"}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
