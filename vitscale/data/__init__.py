"""WebDataset shard streaming: loaders, shard tools, the digits demo dataset."""

from vitscale.data.config import DataConfig
from vitscale.data.loader import (Batch, EvalLoader, TrainLoader, build_eval_loader, build_train_loader)

__all__ = ["DataConfig", "Batch", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader"]
