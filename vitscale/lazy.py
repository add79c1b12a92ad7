"""Package namespaces whose names are imported on first use, so that a torch-free submodule
(`vitscale.model.config`, `vitscale.data.plan`, ...) can be imported without torch.

    _LAZY = {"TrainLoader": "vitscale.data.loader", ...}
    __all__ = list(_LAZY)
    __getattr__ = lazy_attributes(__name__, _LAZY)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ (PEP 562) that imports `names[name]` and returns its `name`."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
