"""Fine-tuning from pretrained weights, the paper's transfer recipe (section 3.2 and appendix B.1.1).

    model = build_finetune_model(config)     # config.finetune.init_from is set

1. Read the pretrained weights and the config they were trained with: exported weights
   (.safetensors, `vitscale.model.weights`) or a training checkpoint (run directory or
   checkpoints/step_XXXXXXXX directory).
2. Rebuild the pretrained model, then move it to the new resolution: the patch size stays, so the
   grid grows (224/16 = 14 -> 384/16 = 24) and learned position embeddings are interpolated in 2-D
   (`VisionTransformer.resample_position_embeddings`, finetune.posemb_resample picks the paper's /
   big_vision's bilinear zoom or timm's antialiased bicubic).
3. Copy the backbone into the model the config describes, whose head (with model.head=finetune)
   is one zero-initialised linear layer for the new classes; the pretraining head (tanh
   pre-logits + classifier) and masked-patch extras are dropped.

The optimiser side of the recipe (SGD momentum 0.9, no weight decay, clipping at 1, cosine decay,
batch 512) is configuration: see configs/finetune_*.yaml.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitscale.errors import ConfigError
from vitscale.model import ModelConfig, VisionTransformer, build_model

HEAD_PREFIXES = ("head.", "pre_logits.")
# Fields that define the backbone's weights; everything else may change when fine-tuning.
ARCHITECTURE_FIELDS = ("in_channels", "classifier", "pos_embed", "norm_position", "mlp_activation")


def load_pretrained(path: str | Path) -> tuple[dict[str, torch.Tensor], "Config"]:  # noqa: F821
    """(fp32 state_dict on CPU, the Config the weights were trained with); the state_dict is
    checked to fit the VisionTransformer that config builds."""
    path = Path(path)
    if path.suffix == ".safetensors" or path.is_file():
        from vitscale.model.weights import load_weights

        return load_weights(path)
    from vitscale.interop.export import load_checkpoint_weights

    return load_checkpoint_weights(path)


def check_compatible(source: ModelConfig, target: ModelConfig, *, reset_head: bool) -> None:
    """The target must have the pretrained backbone's architecture; a ConfigError names the key."""
    old, new = source.shape(), target.shape()
    for name in ("depth", "width", "mlp_dim", "heads", "patch_size"):
        if getattr(old, name) != getattr(new, name):
            raise ConfigError(f"model.{name}", f"{getattr(new, name)} differs from the pretrained model's "
                              f"{getattr(old, name)}", f"set model.name={source.name} and the same shape overrides "
                              "as the pretraining config")
    for name in ARCHITECTURE_FIELDS:
        if getattr(source, name) != getattr(target, name):
            raise ConfigError(f"model.{name}", f"{getattr(target, name)!r} differs from the pretrained model's "
                              f"{getattr(source, name)!r}", f"set model.{name}={getattr(source, name)}")
    if not reset_head and (source.num_classes, source.head, source.representation_size) != (
            target.num_classes, target.head, target.representation_size):
        raise ConfigError("finetune.reset_head", "false keeps the pretrained head, but model.num_classes/head/"
                          "representation_size differ from the pretrained model's",
                          "use finetune.reset_head=true for new classes")


def build_finetune_model(config, log=None) -> VisionTransformer:
    """The model config.model describes, initialised from config.finetune.init_from; `log`
    (a print-like callable) is told how the position embeddings were moved to the new grid."""
    state, source_config = load_pretrained(config.finetune.init_from)
    target_config = config.model
    reset_head = config.finetune.reset_head
    check_compatible(source_config.model, target_config, reset_head=reset_head)
    source = build_model(source_config.model)
    source.load_state_dict(state)
    if source.shape.image_size != target_config.image_size:
        done = source.resample_position_embeddings(target_config.image_size, config.finetune.posemb_resample)
        if log is not None:
            log(f"vitscale: fine-tuning from {config.finetune.init_from}: {done}")
    target = build_model(target_config)
    backbone = {k: v for k, v in source.state_dict().items() if not (reset_head and k.startswith(HEAD_PREFIXES))}
    missing, unexpected = target.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith(HEAD_PREFIXES) for k in missing), (missing, unexpected)
    if reset_head:
        _zero_head(target)
    return target


def _zero_head(model: VisionTransformer) -> None:
    """The paper's fine-tuning head: zero weights and bias, so training starts from the
    pretrained features without a random projection disturbing them."""
    if isinstance(model.head, nn.Linear):
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
