"""Exact matmul + attention FLOPs per image of a ViT config (forward and training).

    forward_flops_per_image(ModelConfig(name="H/14"))   # 3.34e11 at 224 px

One multiply-add counts as 2 FLOPs. Counted: the patch embedding (a matmul in disguise), the
qkv/proj/MLP linears, attention scores (q k^T) and values (p v), the MAP head if any, the
pre-logits and the classifier. Not counted (as in FlopCounterMode and the usual MFU
convention): layer norms, softmax, GELU, biases, residual adds. Training = 3x forward (the
backward pass does two matmuls for each forward one); MFU = training FLOPs x images/s / peak.
"""

from __future__ import annotations

from vitscale.model.config import ModelConfig


def matmul_flops(rows: int, inner: int, cols: int) -> int:
    """(rows, inner) @ (inner, cols): one multiply and one add per inner element."""
    return 2 * rows * inner * cols


def attention_flops(queries: int, keys: int, width: int) -> int:
    """Scores q k^T plus values p v, summed over heads (heads x head_dim = width)."""
    return matmul_flops(queries, width, keys) + matmul_flops(queries, keys, width)


def encoder_block_flops(tokens: int, width: int, mlp_dim: int) -> int:
    qkv = matmul_flops(tokens, width, 3 * width)
    proj = matmul_flops(tokens, width, width)
    mlp = matmul_flops(tokens, width, mlp_dim) + matmul_flops(tokens, mlp_dim, width)
    return qkv + attention_flops(tokens, tokens, width) + proj + mlp


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> int:
    """Attention-pooling head: one learned probe query over all tokens, then proj and MLP."""
    q = matmul_flops(1, width, width)
    kv = matmul_flops(tokens, width, 2 * width)
    proj = matmul_flops(1, width, width)
    mlp = matmul_flops(1, width, mlp_dim) + matmul_flops(1, mlp_dim, width)
    return q + kv + attention_flops(1, tokens, width) + proj + mlp


def head_flops(config: ModelConfig, width: int) -> int:
    # A headless model (num_classes 0) keeps its pre-logits layer: it is part of the representation.
    if config.head == "pretrain" and config.representation_size:
        pre_logits, width = matmul_flops(1, width, config.representation_size), config.representation_size
    else:
        pre_logits = 0
    return pre_logits + (matmul_flops(1, width, config.num_classes) if config.num_classes else 0)


def forward_flops_per_image(config: ModelConfig) -> float:
    shape = config.shape()
    tokens = tokens_per_image(config)
    patch_embed = matmul_flops(shape.num_patches, config.in_channels * shape.patch_size ** 2, shape.width)
    blocks = shape.depth * encoder_block_flops(tokens, shape.width, shape.mlp_dim)
    pool = map_head_flops(tokens, shape.width, shape.mlp_dim) if config.classifier == "map" else 0
    return float(patch_embed + blocks + pool + head_flops(config, shape.width))


def training_flops_per_image(config: ModelConfig) -> float:
    """Forward + backward (2x forward: gradients w.r.t. activations and to weights)."""
    return 3.0 * forward_flops_per_image(config)


def tokens_per_image(config: ModelConfig) -> int:
    return config.shape().num_patches + config.extra_tokens
