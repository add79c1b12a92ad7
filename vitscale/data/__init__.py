"""WebDataset shard streaming: loaders, shard tools, the digits demo dataset.

The loaders (and torch) are imported on first use, so the torch-free parts (`plan`, `config`,
`shards`) can be imported alone, e.g. by `vitscale bench replay`.
"""

from vitscale.lazy import lazy_attributes

_LAZY = {"DataConfig": "vitscale.data.config", "Batch": "vitscale.data.loader", "EvalLoader": "vitscale.data.loader",
         "TrainLoader": "vitscale.data.loader", "build_eval_loader": "vitscale.data.loader",
         "build_train_loader": "vitscale.data.loader"}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
