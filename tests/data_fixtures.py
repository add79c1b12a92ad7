"""Shard fixtures for the data tests: real images (scikit-learn digits) in tiny uneven shards."""

from __future__ import annotations

import pytest

from vitscale.data.datasets import digits_arrays, write_digits_shards
from vitscale.data.writer import encode_image, write_shards

UNEVEN_SHARD_SIZES = (7, 9, 3, 12, 9)  # 40 samples in 5 shards of different sizes


def digit_records(indices, image_size=16, ext="png", multi_label=False):
    images, labels = digits_arrays(image_size)
    for i in indices:
        record = {"__key__": f"digit_{i:05d}", ext: encode_image(images[i], ext)}
        if multi_label:  # the digit and its parity class (10 even / 11 odd): two labels per image
            record["json"] = f"[{int(labels[i])}, {10 + int(labels[i]) % 2}]".encode()
        else:
            record["cls"] = str(int(labels[i])).encode()
        yield record


def write_uneven_shards(out_dir, sizes=UNEVEN_SHARD_SIZES, multi_label=False, prefix="part"):
    """Shards of the given sizes (digits 0..sum-1, in order) -> (pattern, keys)."""
    paths, start = [], 0
    for shard, size in enumerate(sizes):
        _, written = write_shards(digit_records(range(start, start + size), multi_label=multi_label), out_dir,
                                  prefix=f"{prefix}{shard:02d}", max_count=size)
        paths += written
        start += size
    manifest = out_dir / f"{prefix}.txt"
    manifest.write_text("\n".join(p.name for p in paths) + "\n")
    return str(manifest), [f"digit_{i:05d}" for i in range(start)]


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory):
    return write_uneven_shards(tmp_path_factory.mktemp("uneven"))


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return write_digits_shards(out, image_size=32, samples_per_shard=400)


@pytest.fixture(scope="session")
def digits_pixels():
    return digits_arrays(32)


__all__ = ["uneven_shards", "digits_shards", "digits_pixels", "digit_records", "write_uneven_shards"]
