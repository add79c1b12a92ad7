"""Few-shot section of the config tree: the paper's few-shot linear evaluation during pretraining."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vitscale.checks import require_positive
from vitscale.errors import ConfigError


@dataclass
class FewShotConfig:
    # Run few-shot evaluation every this many steps (0: never). Results are logged and exported as
    # Prometheus eval metrics fewshot_{k}shot.
    every: int = 0
    # Shards the k training images per class come from, and held-out shards that are scored.
    train_shards: str = ""
    test_shards: str = ""
    # Classes of the few-shot dataset; 0 means model.num_classes.
    num_classes: int = 0
    # Training images per class, one ridge fit per value (paper: 1, 5, 10, 25).
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    # Held-out images scored per evaluation (the first ones in shard order).
    max_test_images: int = 10000
    # big_vision (the default, for reported numbers): k random images per class from the training
    # shards' images, ridge l2 fixed at 2^10, the mean over `seeds` seeds (big_vision's fewshot_lsr).
    # loo: the first k images per class in shard order, l2 chosen by leave-one-out on them.
    protocol: Literal["big_vision", "loo"] = "big_vision"
    # big_vision protocol: seeds averaged, and the images per class read as the pool the k are
    # drawn from (null: every image of train_shards, as big_vision does).
    seeds: int = 3
    max_train_images_per_class: int | None = None
    # Ridge coefficient; null: 1024 under big_vision, chosen by leave-one-out under loo.
    l2_reg: float | None = None
    # Images per forward pass when extracting features (no gradients are kept).
    micro_batch_size: int = 64

    def validate(self) -> None:
        for name in ("every", "num_classes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"fewshot.{name}", "must be >= 0", "use 0 to disable / to use the default")
        if self.every and not (self.train_shards and self.test_shards):
            raise ConfigError("fewshot.train_shards" if not self.train_shards else "fewshot.test_shards",
                              "few-shot evaluation is on (fewshot.every > 0) but has no shards",
                              "set fewshot.train_shards and fewshot.test_shards, or fewshot.every=0")
        if not self.shots or any(k < 1 for k in self.shots):
            raise ConfigError("fewshot.shots", f"must be positive image counts per class, got {self.shots}",
                              "e.g. [1, 5, 10, 25]")
        require_positive(self, "fewshot", ("max_test_images", "micro_batch_size", "seeds",
                                           "max_train_images_per_class"))
        if self.max_train_images_per_class is not None and self.max_train_images_per_class < max(self.shots):
            raise ConfigError("fewshot.max_train_images_per_class", f"{self.max_train_images_per_class} is below "
                              f"the largest shot count {max(self.shots)}", "raise it, or null to read every image")
        if self.l2_reg is not None and self.l2_reg <= 0:
            raise ConfigError("fewshot.l2_reg", "must be > 0", "use e.g. 1024, or null for the protocol's default")
