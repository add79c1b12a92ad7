"""Small real datasets as shards: scikit-learn's digits (the demo) and its sample photos.

    train_pattern, eval_pattern = write_digits_shards("/tmp/digits", image_size=32)

Nothing is downloaded: both ship inside scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vitscale.data.writer import encode_image, write_shards

DIGITS_CLASSES = 10


def digits_arrays(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as RGB (N, image_size, image_size, 3) uint8 and labels (N,) int64.

    The 8x8 scans (values 0..16) are scaled to 0..255 and upsampled with bicubic interpolation.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    images = np.stack([np.asarray(Image.fromarray(img, "L").resize((image_size, image_size), Image.Resampling.BICUBIC))
                       for img in small])
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int64)


def digits_split(labels: np.ndarray, eval_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified held-out split (indices into the dataset), the same on every machine."""
    from sklearn.model_selection import train_test_split

    train, held_out = train_test_split(np.arange(len(labels)), test_size=eval_fraction, random_state=0,
                                       stratify=labels)
    return np.sort(train), np.sort(held_out)


def write_digits_shards(out_dir: str | Path, *, image_size: int = 32, samples_per_shard: int = 256,
                        image_format: str = "png", eval_fraction: float = 0.2) -> tuple[str, str]:
    """scikit-learn digits as `.png` (or `.jpg`) + `.cls` shards -> (train_pattern, eval_pattern).

    Keys are `digit_NNNNN` with NNNNN the index in `load_digits()`.
    """
    images, labels = digits_arrays(image_size)
    train, held_out = digits_split(labels, eval_fraction)
    ext = "jpg" if image_format in ("jpg", "jpeg") else "png"

    def records(indices):
        for i in indices:
            yield {"__key__": f"digit_{i:05d}", ext: encode_image(images[i], ext), "cls": str(int(labels[i])).encode()}

    train_pattern, _ = write_shards(records(train), out_dir, prefix="train", max_count=samples_per_shard)
    eval_pattern, _ = write_shards(records(held_out), out_dir, prefix="eval", max_count=samples_per_shard)
    return train_pattern, eval_pattern


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-learn's two sample photos (427x640 JPEG-decoded RGB): [(name, pixels)]."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return [(Path(f).stem, np.asarray(img)) for f, img in zip(photos.filenames, photos.images)]
