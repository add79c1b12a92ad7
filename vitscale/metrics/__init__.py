"""Prometheus metrics of training runs and the `vitscale report` plots."""

from vitscale.metrics.config import MetricsConfig
from vitscale.metrics.training import TrainingMetrics

__all__ = ["MetricsConfig", "TrainingMetrics"]
