"""Small validators the config sections share; each raises a ConfigError naming the key."""

from __future__ import annotations

import typing

from vitscale.errors import ConfigError


def require_positive(section: typing.Any, prefix: str, names: typing.Iterable[str]) -> None:
    """Every named field must be > 0 (None means 'not set' and passes)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{name}", f"must be > 0, got {value}", "use a positive value")


def require_range(section: typing.Any, prefix: str, name: str, low: float, high: float) -> None:
    """low <= value <= high."""
    value = getattr(section, name)
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{prefix}.{name}", f"must be in [{low}, {high}], got {value}", "pick a value in range")
