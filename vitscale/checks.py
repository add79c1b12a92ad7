"""Small validators the config sections share; each raises a ConfigError naming the key."""

from __future__ import annotations

import math
import typing

from vitscale.errors import ConfigError


def require_finite(section: typing.Any, prefix: str, name: str) -> None:
    """NaN and inf compare false with every bound, so they would slip past the checks below."""
    value = getattr(section, name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{prefix}.{name}", f"must be a finite number, got {value}", "give a real value, e.g. 1e-3")


def require_positive(section: typing.Any, prefix: str, names: typing.Iterable[str]) -> None:
    """Every named field must be a finite number > 0 (None means 'not set' and passes)."""
    for name in names:
        require_finite(section, prefix, name)
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{name}", f"must be > 0, got {value}", "use a positive value")


def require_range(section: typing.Any, prefix: str, name: str, low: float, high: float) -> None:
    """low <= value <= high."""
    value = getattr(section, name)
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{prefix}.{name}", f"must be in [{low}, {high}], got {value}", "pick a value in range")
