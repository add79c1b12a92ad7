"""The ViT model family. Imports nothing from torch.distributed or deepspeed: the engine wraps it.

Names are imported on first use, so `vitscale.model.config` (and `vitscale.config`) load without torch.
"""

from vitscale.lazy import lazy_attributes

_LAZY = {"SIZES": "vitscale.model.config",
         "ModelConfig": "vitscale.model.config", "ViTShape": "vitscale.model.config",
         "parse_model_name": "vitscale.model.config", "VisionTransformer": "vitscale.model.vit",
         "build_model": "vitscale.model.vit", "count_parameters": "vitscale.model.vit"}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
