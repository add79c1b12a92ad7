"""Data section of the config tree."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vitscale.checks import require_positive, require_range
from vitscale.errors import ConfigError


@dataclass
class DataConfig:
    # Training shards: a brace pattern ("/data/i21k-{000000..004095}.tar"), a directory of .tar
    # files, or a manifest (.txt, one shard per line). `pipe:` URLs need allow_shell=true.
    train_shards: str = ""
    # Held-out shards for periodic evaluation; empty disables evaluation.
    eval_shards: str = ""
    # Per-shard sample counts (`_info.json`, written by `vitscale shards write|check`). Empty: the
    # `_info.json` beside the first shard, else local shards are counted at start-up.
    index: str = ""
    # Labels as `.json` lists of class ids (multi-hot targets, sigmoid loss) instead of `.cls`.
    multi_label: bool = False
    # Class names -> ids for `.json` labels given as names: a JSON list or {name: id}, or a text
    # file with one name per line. Empty: labels must be integer ids.
    class_map: str = ""
    # DataLoader worker processes per rank that read, decode and augment (0: in the main process).
    num_workers: int = 4
    # Samples each worker holds for shuffling (raw bytes, not decoded images).
    shuffle_buffer: int = 5000
    # Shuffle the shard order every epoch (seed + epoch); off gives file order.
    shuffle_shards: bool = True
    # Draw the shards of each epoch with replacement (infinite-data style) instead of a permutation.
    resampled: bool = False
    # `pipe:` shard URLs run a shell command: only when the config says so explicitly.
    allow_shell: bool = False
    # When shards < ranks x workers: split shards between readers at sample level, or refuse.
    few_shards: Literal["rebalance", "refuse"] = "rebalance"
    # Resuming a checkpoint: "exact" continues its data position (every sample of the epoch
    # once; refused if a setting that orders samples changed), "reset" keeps model and optimizer
    # and starts a fresh epoch (after the shards were rewritten, or the shuffle changed).
    resume: Literal["exact", "reset"] = "exact"
    # Corrupt input: tolerant (skip, count, record in the ledger) or strict (stop, naming it).
    strict: bool = False
    # Ledger of skipped samples (JSON lines). Empty: <run dir>/skipped_samples.rankNNNNN.jsonl
    # when the engine passes a run directory, else counts only.
    skip_ledger: str = ""
    # Images with more pixels are skipped before they are decoded (decompression bombs).
    max_image_pixels: int = 8192 * 8192
    # EXIF orientation of photos: "ignore" (the pixels as stored, as torchvision's, timm's and
    # tf.data's decoders read them: published recipes trained so) or "apply" (rotate upright).
    exif_orientation: Literal["ignore", "apply"] = "ignore"
    # Decode JPEGs at a reduced size (DCT-domain scaling) when the crop allows it.
    fast_decode: bool = True
    # JPEG decoder: simplejpeg (libjpeg-turbo, scales by M/8, no PIL image object; CMYK, EXIF
    # rotation and streams it refuses fall back to PIL) or pil (PIL's draft mode: 1/2, 1/4, 1/8).
    jpeg_decoder: Literal["simplejpeg", "pil"] = "simplejpeg"
    # RandomResizedCrop area and aspect-ratio ranges (torchvision / Inception defaults).
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    # Random horizontal flip (p = 0.5) after the crop.
    hflip: bool = True
    # Normalisation to [-1, 1], as the released ViT code does.
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # Evaluation: resize the short side to image_size / eval_crop_fraction, then centre-crop.
    eval_crop_fraction: float = 1.0
    # AugReg options, off by default for large-data pretraining (Steiner et al. 2021).
    randaugment_layers: int = 0
    randaugment_magnitude: int = 10
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Page-locked host batches, so the host-to-GPU copy can overlap the step.
    pin_memory: bool = True
    # Batches each worker prepares ahead of the step that consumes them.
    prefetch_factor: int = 2

    def validate(self) -> None:
        require_positive(self, "data", ("shuffle_buffer", "max_image_pixels", "prefetch_factor"))
        require_range(self, "data", "eval_crop_fraction", 1e-3, 1.0)
        require_range(self, "data", "randaugment_magnitude", 0, 30)
        for name in ("num_workers", "randaugment_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}", f"must be >= 0, got {getattr(self, name)}", "use 0 or more")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}", "must be >= 0", "use 0 to disable, e.g. 0.2 to enable")
        self._validate_pair("crop_scale", 0.0, 1.0)
        self._validate_pair("crop_ratio", 0.0, float("inf"))
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"data.{name}", "needs 3 values (R, G, B)", "write e.g. [0.5, 0.5, 0.5]")
        if any(s <= 0 for s in self.std):
            raise ConfigError("data.std", "values must be > 0", "use the per-channel standard deviation")
        for name in ("train_shards", "eval_shards"):
            if "pipe:" in getattr(self, name) and not self.allow_shell:
                raise ConfigError(f"data.{name}", "`pipe:` URLs run shell commands",
                                  "set data.allow_shell=true if you trust this config")

    def _validate_pair(self, name: str, low: float, high: float) -> None:
        pair = getattr(self, name)
        if len(pair) != 2 or not low < pair[0] <= pair[1] <= high:
            raise ConfigError(f"data.{name}", f"must be [min, max] with {low} < min <= max <= {high}, got {pair}",
                              "write e.g. [0.08, 1.0]")
