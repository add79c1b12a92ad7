"""The ViT model family. Imports nothing from torch.distributed or deepspeed: the engine wraps it."""

from vitscale.model.attention import attention
from vitscale.model.config import SIZES, ModelConfig, ViTShape, parse_model_name
from vitscale.model.vit import VisionTransformer, build_model, count_parameters

__all__ = ["SIZES", "ModelConfig", "ViTShape", "VisionTransformer", "attention", "build_model",
           "count_parameters", "parse_model_name"]
