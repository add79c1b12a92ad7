"""Writing shards: records -> numbered tar files of a fixed sample count (or byte budget) + index.

A record is a WebDataset sample dict: {"__key__": "name", "jpg": bytes, "cls": b"7"} (or "json"
for multi-label). Shards roll over at `max_count` samples or before exceeding `max_bytes`, so the
same input always gives the same shards, byte for byte (fixed mtime and owner).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset
from PIL import Image

from vitscale.data.shards import INDEX_NAME, read_index, write_index
from vitscale.errors import DataError


def encode_image(pixels: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> PNG (lossless) or JPEG bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif image_format in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=quality)
    else:
        raise DataError(f"image format {image_format!r} is not supported (use png or jpg)")
    return buffer.getvalue()


def write_shards(records: Iterable[dict], out_dir: str | Path, *, prefix: str = "shard", max_count: int = 1000,
                 max_bytes: int | None = None, progress=None) -> tuple[str, list[Path]]:
    """Write records to out_dir/prefix-000000.tar, ...; update out_dir/_info.json. -> (pattern, paths).

    All or nothing: shards are written under temporary names and renamed once every record is in,
    so a failure (a bad record, a full disk) leaves the directory, and any earlier shards of the
    same names, as they were."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    entries: dict[str, dict] = {}
    writer, count, size = None, 0, 0
    try:
        for record in records:
            record_bytes = sum(len(v) for k, v in record.items() if not k.startswith("_"))
            full = count >= max_count or (max_bytes is not None and count and size + record_bytes > max_bytes)
            if writer is None or full:
                if writer is not None:
                    _finish(writer, paths[-1], count, entries)
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                writer = webdataset.TarWriter(str(_partial(paths[-1])), user="vitscale", group="vitscale", mtime=0.0)
                count, size = 0, 0
            writer.write(record)
            count, size = count + 1, size + record_bytes + 1024 * len(record)  # headers: 512 B + padding
            if progress is not None:
                progress.update(1)
        if writer is None:
            raise DataError("no samples to write (the source is empty)")
        _finish(writer, paths[-1], count, entries)
    except BaseException:
        if writer is not None:
            writer.close()
        for path in paths:
            _partial(path).unlink(missing_ok=True)
        raise
    for path in paths:
        _partial(path).replace(path)
    index = read_index(out_dir / INDEX_NAME)
    index.update(entries)
    write_index(out_dir / INDEX_NAME, index)
    return shard_pattern(out_dir, prefix, len(paths)), paths


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _finish(writer, path: Path, count: int, entries: dict) -> None:
    writer.close()
    entries[path.name] = {"samples": count, "bytes": _partial(path).stat().st_size}


def shard_pattern(out_dir: Path, prefix: str, num_shards: int) -> str:
    last = num_shards - 1
    return str(out_dir / (f"{prefix}-{{000000..{last:06d}}}.tar" if last else f"{prefix}-000000.tar"))
