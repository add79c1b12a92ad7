"""Config sections for fine-tuning (`finetune:`) and masked patch prediction (`masked_patch:`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vitscale.checks import require_range
from vitscale.errors import ConfigError
from vitscale.model.config import ResampleMethod

MaskedTarget = Literal["mean_color", "downsized", "full_patch"]


@dataclass
class FinetuneConfig:
    # Start from pretrained weights: a run directory (its latest complete checkpoint), one
    # checkpoint directory (.../checkpoints/step_XXXXXXXX), or exported weights (.safetensors).
    # null trains from scratch. The model section describes the fine-tuned model: same
    # architecture, typically a higher image_size and the new num_classes.
    init_from: str | None = None
    # Paper: the pretraining head (pre-logits + classifier) is replaced by one zero-initialised
    # linear layer for the new classes. false keeps it (same classes, e.g. resolution-only).
    reset_head: bool = True
    # How learned position embeddings (and relative-bias tables) are interpolated when
    # model.image_size differs from the pretrained one: bilinear_corners is the paper's released
    # code and big_vision (scipy.ndimage.zoom, order 1); bicubic_antialias is timm's default
    # (resample_abs_pos_embed); bicubic is PyTorch's without antialiasing. The three differ by a
    # few percent of the embeddings' scale, so reproduce a result with the codebase it came from.
    posemb_resample: ResampleMethod = "bilinear_corners"

    def validate(self) -> None:
        if self.init_from is not None and not str(self.init_from).strip():
            raise ConfigError("finetune.init_from", "is empty", "give a run/checkpoint directory or a "
                              ".safetensors file, or null to train from scratch")


@dataclass
class MaskedPatchConfig:
    # What each corrupted patch's output predicts (paper, section 4.6 / appendix B.1):
    # mean_color: its mean colour in 3 bits per channel (one 512-way classification; best few-shot);
    # downsized: its 4x4 downsized version in 3-bit colour (16 predictions of 512 classes);
    # full_patch: all its pixels by L2 regression (worst in the paper).
    target: MaskedTarget = "mean_color"
    # Fraction of patch embeddings corrupted per image (paper: 50%) ...
    corrupt_ratio: float = 0.5
    # ... of which these fractions are replaced by the learnable [mask] embedding and by another
    # random patch's embedding; the rest are kept unchanged (paper: 80/10/10, as BERT).
    mask_prob: float = 0.8
    random_prob: float = 0.1
    # Bits per colour channel of the mean_color/downsized targets (paper: 3, i.e. 512 colours).
    color_bits: int = 3
    # Side of the downsized target (paper: 4, a 4x4 version of each patch).
    downsized_size: int = 4

    def validate(self) -> None:
        require_range(self, "masked_patch", "corrupt_ratio", 1e-6, 1.0)
        require_range(self, "masked_patch", "mask_prob", 0.0, 1.0)
        require_range(self, "masked_patch", "random_prob", 0.0, 1.0)
        if self.mask_prob + self.random_prob > 1.0 + 1e-9:
            raise ConfigError("masked_patch.random_prob", f"mask_prob + random_prob = "
                              f"{self.mask_prob + self.random_prob:g} exceeds 1",
                              "the remainder is the fraction kept; e.g. 0.8 and 0.1")
        if not 1 <= self.color_bits <= 8:
            raise ConfigError("masked_patch.color_bits", f"{self.color_bits} is not in [1, 8]",
                              "paper: 3 bits per channel (512 colours)")
        if self.downsized_size < 1:
            raise ConfigError("masked_patch.downsized_size", "must be >= 1", "paper: 4 (a 4x4 patch)")


def check_research_rules(config) -> None:
    """Rules spanning sections, for the whole config tree (called by Config.validate)."""
    optim, engine = config.optim, config.engine
    if optim.name in ("sam", "gsam"):
        if engine.kind == "fsdp2":
            raise ConfigError("engine.kind", f"optim.name={optim.name} needs each rank to hold the full weights "
                              "to perturb them; FSDP2 shards them", "use engine.kind=deepspeed (ZeRO 0-2) or local")
        if engine.zero_stage == 3 and engine.kind == "deepspeed":
            raise ConfigError("engine.zero_stage", f"optim.name={optim.name} needs each rank to hold the full "
                              "weights to perturb them; ZeRO-3 shards them", "use engine.zero_stage 0, 1 or 2")
        if engine.precision == "fp16":
            raise ConfigError("engine.precision", f"optim.name={optim.name} takes its extra gradient without "
                              "fp16 loss scaling, which would underflow", "use bf16 or fp32")
    finetune = config.finetune
    if finetune.init_from and finetune.reset_head and config.model.head != "finetune":
        raise ConfigError("model.head", f"{config.model.head!r} with finetune.init_from builds a new pretraining "
                          "head; the paper fine-tunes with one zero-initialised linear layer",
                          "set model.head=finetune (configs/finetune_*.yaml do)")
    if finetune.init_from and config.model.num_classes == 0:
        raise ConfigError("model.num_classes", "is 0 while fine-tuning", "use the new dataset's class count")
    if config.run.objective == "masked_patch" and config.finetune.init_from:
        raise ConfigError("run.objective", "masked_patch pretrains from scratch; finetune.init_from is set",
                          "use run.objective=classification to fine-tune, or finetune.init_from=null")
