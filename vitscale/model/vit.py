"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), configurable for the paper's ablations.

    images (B, C, H, W)
      -> PatchEmbed                (B, N, D)      N = (H/P) * (W/P)
      -> [class] token             (B, 1+N, D)    (classifier="token", or class_token=true)
      -> + position embedding
      -> depth x EncoderBlock      pre-LN: x + MHA(LN(x)); x + MLP(LN(x))
      -> final LN (pre-LN only)
      -> pool: [class] / mean of patches (GAP) / attention probe (MAP)   (B, D)
      -> head: tanh pre-logits + linear (pretraining) or one zero-init linear (fine-tuning)
"""

from __future__ import annotations

import math

import torch
from einops import repeat
from torch import nn

from vitscale.model import posemb
from vitscale.model.config import ModelConfig, ViTShape
from vitscale.model.layers import AttentionPoolingHead, EncoderBlock, PatchEmbed


class VisionTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        shape = self.shape = config.shape()
        width = shape.width
        self.extra_tokens = config.extra_tokens
        self.patch_embed = PatchEmbed(shape.patch_size, config.in_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if self.extra_tokens else None
        self.pos_embed = posemb.build_position_embedding(config.pos_embed, shape.grid, width, shape.heads,
                                                         self.extra_tokens)
        self.dropout = nn.Dropout(config.dropout)
        drop_rates = [config.drop_path * i / max(shape.depth - 1, 1) for i in range(shape.depth)]
        self.blocks = nn.ModuleList(
            EncoderBlock(width, shape.mlp_dim, shape.heads, backend=config.attention_backend,
                         norm_position=config.norm_position, dropout=config.dropout,
                         attention_dropout=config.attention_dropout, drop_path=rate, eps=config.layer_norm_eps,
                         activation=config.mlp_activation)
            for rate in drop_rates)
        # Relative position bias: one table per block (each layer learns its own geometry).
        self.relative_bias = nn.ModuleList(
            posemb.RelativePositionBias(shape.grid, shape.heads, self.extra_tokens) for _ in range(shape.depth)
        ) if config.pos_embed == "relative" else None
        # Post-LN blocks end in a norm already.
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if config.norm_position == "pre" else nn.Identity()
        self.pool = AttentionPoolingHead(width, shape.mlp_dim, shape.heads, config.layer_norm_eps,
                                         config.mlp_activation) \
            if config.classifier == "map" else None
        self.pre_logits, self.head = self._build_head(width)
        self.reset_parameters()

    @property
    def num_features(self) -> int:
        return self.shape.width

    def _build_head(self, width: int) -> tuple[nn.Module, nn.Module]:
        config = self.config
        if config.head == "pretrain" and config.representation_size:
            # A headless backbone keeps its pre-logits: they are part of the representation.
            pre_logits = nn.Sequential(nn.Linear(width, config.representation_size), nn.Tanh())
            head = nn.Linear(config.representation_size, config.num_classes) if config.num_classes else nn.Identity()
            return pre_logits, head
        return nn.Identity(), nn.Linear(width, config.num_classes) if config.num_classes else nn.Identity()

    def reset_parameters(self) -> None:
        """big_vision's init: Xavier-uniform linears, tiny MLP biases, LeCun-normal patch
        projection; the fine-tuning head starts at zero so it does not disturb the features."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=1e-6) if ".mlp." in f".{name}." else nn.init.zeros_(module.bias)
        fan_in = self.patch_embed.proj.in_channels * self.shape.patch_size ** 2
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            if self.config.head == "finetune":
                nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # Entry points: forward (logits), forward_representation (few-shot), forward_features
    # (masked patch prediction). They call the private bodies below, never each other, so an
    # engine may wrap each entry point (FSDP2 gathers the root's parameters around it) unnested.

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._represent(images))

    def forward_representation(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen representation used for few-shot evaluation: pooled (and pre-logits)."""
        return self._represent(images)

    def forward_features(self, images: torch.Tensor, patch_transform=None) -> torch.Tensor:
        """Images -> all output tokens after the final norm: (B, extra + N, D).
        `patch_transform` maps the patch embeddings (B, N, D) before the [class] token and position
        embeddings are added (masked patch prediction corrupts them there)."""
        return self._encode(images, patch_transform)

    def _represent(self, images: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(self.pool_features(self._encode(images)))

    def _encode(self, images: torch.Tensor, patch_transform=None) -> torch.Tensor:
        x = self.patch_embed(images)
        if patch_transform is not None:
            x = patch_transform(x)
        if self.cls_token is not None:
            x = torch.cat([repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0]).to(x.dtype), x], dim=1)
        x = self.dropout(self.pos_embed(x))
        for index, block in enumerate(self.blocks):
            bias = self.relative_bias[index]() if self.relative_bias is not None else None
            x = block(x, bias)
        return self.norm(x)

    def pool_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> one representation per image: (B, D)."""
        if self.config.classifier == "token":
            return tokens[:, 0]
        if self.config.classifier == "gap":
            return tokens[:, self.extra_tokens:].mean(dim=1)
        return self.pool(tokens)

    # -----------------------------------------------------------------------------------------
    def resample_position_embeddings(self, new_image_size: int, method: str = "bilinear_corners") -> str:
        """Move the model to a new input resolution (same patch size): learned embeddings are
        interpolated in 2-D by `method` (posemb.RESAMPLE_METHODS), the [class] embedding is kept
        and fixed tables are rebuilt. Returns one line saying what was done, for the run's log."""
        new_shape = ViTShape(**{**self.shape.__dict__, "image_size": new_image_size})
        if new_image_size % self.shape.patch_size:
            from vitscale.errors import ConfigError

            raise ConfigError("model.image_size", f"{new_image_size} is not divisible by the patch size "
                              f"{self.shape.patch_size}", "choose a multiple of the patch size")
        grid, new_grid = self.shape.grid, new_shape.grid
        pos = self.pos_embed
        with torch.no_grad():
            if isinstance(pos, posemb.LearnedPositionEmbedding1D):
                weight = posemb.resample_1d_embedding(pos.weight, self.extra_tokens, new_grid, method)
                pos.weight = nn.Parameter(weight)
                pos.grid = new_grid
            elif isinstance(pos, posemb.LearnedPositionEmbedding2D):
                pos.rows = nn.Parameter(posemb.resample_axis(pos.rows, new_grid, method))
                pos.cols = nn.Parameter(posemb.resample_axis(pos.cols, new_grid, method))
                pos.grid = new_grid
            elif isinstance(pos, posemb.SinCosPositionEmbedding2D):
                self.pos_embed = posemb.SinCosPositionEmbedding2D(new_grid, self.shape.width, self.extra_tokens)
            if self.relative_bias is not None:
                for bias in self.relative_bias:
                    table = posemb.resample_relative_table(bias.table, grid, new_grid, self.extra_tokens, method)
                    bias.table = nn.Parameter(table)
                    bias.grid = new_grid
                    bias.index = posemb.relative_index(new_grid, self.extra_tokens).to(table.device)
        self.shape = new_shape
        self.config.image_size = new_image_size
        kind = self.config.pos_embed
        how = {"none": "no position embeddings to resample", "sincos_2d": "sincos_2d table rebuilt",
               "relative": f"relative-bias tables resampled {method}"}.get(kind, f"{kind} resampled {method}")
        return f"{grid}x{grid} -> {new_grid}x{new_grid} patch grid ({new_image_size} px): {how}"


def build_model(config: ModelConfig) -> VisionTransformer:
    return VisionTransformer(config)


def count_parameters(model: nn.Module, *, include_head: bool = True) -> int:
    params = {id(p): p for p in model.parameters()}
    if not include_head and isinstance(model, VisionTransformer):
        for p in list(model.head.parameters()) + list(model.pre_logits.parameters()):
            params.pop(id(p), None)
    return sum(p.numel() for p in params.values())
