"""Model section of the config tree, and the one table that decodes names like "H/14".

Sizes are the ViT paper's (Table 1) plus the g/G follow-ups. `ModelConfig.shape()` resolves the
name and any explicit overrides (depth, width, ...) into a concrete `ViTShape`, checking that the
image tiles into patches and the width splits into heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from vitscale.checks import require_positive, require_range
from vitscale.errors import ConfigError

# name: (depth, width D, MLP dim, heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
    "g": (40, 1408, 6144, 16),
    "G": (48, 1664, 8192, 16),
}
PATCH_SIZES = (8, 14, 16, 32)

Classifier = Literal["token", "gap", "map"]
PosEmbed = Literal["none", "learned_1d", "learned_2d", "sincos_2d", "relative"]
# How a learned grid is interpolated to a new grid size when fine-tuning at another resolution:
#   bicubic_antialias: timm's resample_abs_pos_embed default (PyTorch bicubic with antialias=True,
#       i.e. Keys' a = -0.5 kernel, widened when shrinking);
#   bicubic: PyTorch bicubic without antialiasing (a = -0.75, align_corners=False);
#   bilinear_corners: big_vision's and vision_transformer's resample_posemb
#       (scipy.ndimage.zoom(order=1): bilinear with the corner embeddings kept in place).
ResampleMethod = Literal["bicubic_antialias", "bicubic", "bilinear_corners"]
AttentionBackend = Literal["auto", "math", "sdpa", "triton", "flash"]


@dataclass(frozen=True)
class ViTShape:
    depth: int
    width: int
    mlp_dim: int
    heads: int
    patch_size: int
    image_size: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass
class ModelConfig:
    # "B/16", "H/14", ...: size from SIZES, patch from the number.
    name: str = "B/16"
    # Training resolution in pixels (square); fine-tuning at 384 resamples the position embeddings.
    image_size: int = 224
    # Image channels (3: RGB; the loader converts grayscale and CMYK).
    in_channels: int = 3
    # 21,843 for ImageNet-21k; 0 builds the backbone without a classification head.
    num_classes: int = 21843
    # Explicit overrides of the named size (None keeps the table's value): for shape ablations.
    depth: int | None = None
    width: int | None = None
    mlp_dim: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    # Image representation fed to the head: the [class] token (paper), global average pooling of
    # the patch tokens, or multi-head attention pooling (big_vision's "map").
    classifier: Classifier = "token"
    # A [class] token in the sequence: null (the default) means exactly when classifier=token;
    # true with classifier=gap averages the patch tokens only (timm's class_token + global_pool=avg).
    class_token: bool | None = None
    # Position embeddings: none, learned 1-D (paper default), learned 2-D (row + column),
    # fixed 2-D sine-cosine, or a learned relative bias inside attention (sdpa/math backends).
    pos_embed: PosEmbed = "learned_1d"
    # LayerNorm before each residual branch (pre-LN, the paper's ViT) or after the residual sum.
    norm_position: Literal["pre", "post"] = "pre"
    # Attention kernel: math (plain PyTorch), sdpa (torch's scaled_dot_product_attention), triton
    # (vitscale's fused kernel, kernels/), flash (flash-attn, GPU only), or auto: sdpa where a bias
    # or dropout is needed, else what `vitscale bench attention --save-choices` measured fastest
    # for this device and shape (sdpa when nothing was measured).
    attention_backend: AttentionBackend = "auto"
    # Dropout after each MLP layer and the attention output projection, and on the embeddings
    # (paper: 0.1 for ImageNet-1k, none at scale).
    dropout: float = 0.0
    # Dropout on the attention probabilities (sdpa and math backends only).
    attention_dropout: float = 0.0
    # Stochastic depth: drop-path rate of the last block, linearly increasing from 0.
    drop_path: float = 0.0
    # Pretraining head: a tanh "pre-logits" layer of this size before the classifier (paper);
    # None or 0 for none. Fine-tuning replaces the head with one zero-initialised linear layer.
    representation_size: int | None = None
    # Which head is built: the pretraining head (with the pre-logits layer above, if any) or the
    # fine-tuning one (a single zero-initialised linear layer).
    head: Literal["pretrain", "finetune"] = "pretrain"
    # Epsilon of every LayerNorm (1e-6 as in the released ViT code; timm's ViTs use the same).
    layer_norm_eps: float = 1e-6
    # MLP nonlinearity: exact GELU (PyTorch, timm, Hugging Face) or its tanh approximation (Flax's
    # default, so the Google/big_vision checkpoints were trained with it).
    mlp_activation: Literal["gelu", "gelu_tanh"] = "gelu"

    def validate(self) -> None:
        require_positive(self, "model", ("image_size", "in_channels", "depth", "width", "mlp_dim",
                                         "heads", "patch_size", "layer_norm_eps"))
        if self.num_classes < 0:
            raise ConfigError("model.num_classes", f"must be >= 0, got {self.num_classes}",
                              "use the dataset's class count, or 0 for a headless backbone")
        for name in ("dropout", "attention_dropout", "drop_path"):
            require_range(self, "model", name, 0.0, 0.99)
        if self.representation_size is not None and self.representation_size < 0:
            raise ConfigError("model.representation_size", "must be >= 0", "use 0 or null for no pre-logits")
        if self.class_token is False and self.classifier == "token":
            raise ConfigError("model.class_token", "false, but classifier=token pools the [class] token",
                              "drop model.class_token or use classifier=gap or map")
        if self.pos_embed == "relative" and self.attention_backend in ("triton", "flash"):
            raise ConfigError("model.attention_backend", f"{self.attention_backend} takes no attention bias, "
                              "which pos_embed=relative needs", "use sdpa, math or auto")
        if self.attention_dropout > 0 and self.attention_backend in ("triton", "flash"):
            raise ConfigError("model.attention_dropout", f"not supported by the {self.attention_backend} backend",
                              "set it to 0 (the paper uses none) or use sdpa/math")
        self.shape()

    @property
    def has_class_token(self) -> bool:
        return self.classifier == "token" if self.class_token is None else self.class_token

    @property
    def extra_tokens(self) -> int:
        """Tokens in the sequence besides the patches."""
        return int(self.has_class_token)

    @property
    def label(self) -> str:
        """The model's name where it is true, e.g. "H/14"; derived from the shape when explicit
        depth/width/mlp_dim/heads/patch_size overrides change the named size ("H/14" with depth 2
        is not an H/14): "depth2-width160-mlp320-heads2/14". Metrics and logs use this."""
        size, patch = parse_model_name(self.name)
        shape = self.shape()
        if (shape.depth, shape.width, shape.mlp_dim, shape.heads, shape.patch_size) == (*SIZES[size], patch):
            return f"{size}/{patch}"
        return f"depth{shape.depth}-width{shape.width}-mlp{shape.mlp_dim}-heads{shape.heads}/{shape.patch_size}"

    def shape(self) -> ViTShape:
        size, patch = parse_model_name(self.name)
        depth, width, mlp_dim, heads = SIZES[size]
        shape = ViTShape(
            depth=self.depth or depth,
            width=self.width or width,
            mlp_dim=self.mlp_dim or mlp_dim,
            heads=self.heads or heads,
            patch_size=self.patch_size or patch,
            image_size=self.image_size,
        )
        if shape.image_size % shape.patch_size:
            raise ConfigError("model.image_size", f"{shape.image_size} is not divisible by the patch size "
                              f"{shape.patch_size}", f"use a multiple of {shape.patch_size}, e.g. "
                              f"{round(shape.image_size / shape.patch_size) * shape.patch_size}")
        if shape.width % shape.heads:
            raise ConfigError("model.heads", f"width {shape.width} does not split into {shape.heads} heads",
                              "choose heads that divide the width")
        if self.pos_embed == "learned_2d" and shape.width % 2:
            raise ConfigError("model.pos_embed", "learned_2d needs an even width (X and Y halves)",
                              "use an even width or learned_1d")
        if self.pos_embed == "sincos_2d" and shape.width % 4:
            raise ConfigError("model.pos_embed", "sincos_2d needs a width divisible by 4",
                              "use such a width or learned_1d")
        return shape


def parse_model_name(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"\s*([A-Za-z]+)\s*/\s*(\d+)\s*", name)
    if not match or match.group(1) not in SIZES:
        raise ConfigError("model.name", f"unknown model {name!r}",
                          f"use SIZE/PATCH with SIZE in {', '.join(SIZES)} and PATCH e.g. 16, as in B/16")
    patch = int(match.group(2))
    if patch <= 0:
        raise ConfigError("model.name", f"patch size {patch} must be positive", "e.g. B/16")
    return match.group(1), patch
