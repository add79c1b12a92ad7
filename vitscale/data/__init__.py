"""WebDataset shard streaming: loaders, shard tools, the digits demo dataset.

The loaders (and torch) are imported on first use, so the torch-free parts (`plan`, `config`,
`shards`) can be imported alone, e.g. by `vitscale bench replay`.
"""

import importlib

_LAZY = {"DataConfig": "vitscale.data.config", "Batch": "vitscale.data.loader", "EvalLoader": "vitscale.data.loader",
         "TrainLoader": "vitscale.data.loader", "build_eval_loader": "vitscale.data.loader",
         "build_train_loader": "vitscale.data.loader"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vitscale.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
