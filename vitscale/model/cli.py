"""`vitscale model`: parameter counts of a model config, built on the meta device (no memory)."""

from __future__ import annotations

import torch

from vitscale.config import add_config_arguments, config_from_args
from vitscale.model.flops import forward_flops_per_image, training_flops_per_image
from vitscale.model.vit import build_model, count_parameters


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    config = config_from_args(args)
    with torch.device("meta"):
        model = build_model(config.model)
    shape = model.shape
    total = count_parameters(model)
    backbone = count_parameters(model, include_head=False)
    tokens = shape.num_patches + model.extra_tokens
    print(f"model {config.model.name} at {shape.image_size}px: depth {shape.depth}, width {shape.width}, "
          f"MLP {shape.mlp_dim}, heads {shape.heads} (head dim {shape.head_dim}), {tokens} tokens")
    print(f"parameters: {total / 1e6:.2f}M total, {backbone / 1e6:.2f}M without the classification head")
    print(f"FLOPs per image: {forward_flops_per_image(config.model) / 1e9:.2f} G forward, "
          f"{training_flops_per_image(config.model) / 1e9:.2f} G training (fwd + bwd)")
    return 0
