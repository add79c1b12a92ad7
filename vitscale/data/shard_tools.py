"""`vitscale shards write|check|plan` logic: sources -> shards, full verification, reader plan."""

from __future__ import annotations

import collections
import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vitscale.data import plan as planning
from vitscale.data.decode import IMAGE_EXTENSIONS, LabelSpec, SampleError, decode_image, decode_target, image_bytes
from vitscale.data.loader import check_shard_count
from vitscale.data.shards import (INDEX_NAME, expand_shards, iter_shard, read_index, shard_name, shard_sample_counts,
                                  write_index)
from vitscale.data.writer import write_shards
from vitscale.errors import DataError

# ---------------------------------------------------------------------------------------------
# write: an image folder with class sub-folders, or a CSV / JSONL manifest of path + label(s).


@dataclass(frozen=True)
class SourceItem:
    path: str
    labels: tuple  # class ids (int) or names (str)
    key: str


def folder_items(root: Path) -> tuple[list[SourceItem], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected ROOT/CLASS/IMAGE.jpg)")
    items = []
    for class_id, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and path.is_file():
                items.append(SourceItem(str(path), (class_id,), sample_key(path.relative_to(root))))
    return items, classes


def manifest_items(manifest: Path) -> list[SourceItem]:
    """CSV with columns path,label (labels separated by ';') or JSONL {"path", "label"|"labels"}."""
    rows = _manifest_rows(manifest)
    items = []
    for line, row in enumerate(rows, start=2 if manifest.suffix == ".csv" else 1):
        path = row.get("path")
        raw = row.get("labels", row.get("label"))
        if not path or raw is None or raw == "":
            raise DataError(f"{manifest} line {line}: needs a path and a label (columns path,label)")
        labels = raw if isinstance(raw, list) else str(raw).split(";") if isinstance(raw, str) else [raw]
        path = path if os.path.isabs(path) else str(manifest.parent / path)
        items.append(SourceItem(path, tuple(_label_value(v) for v in labels), sample_key(Path(row["path"]))))
    return items


def _manifest_rows(manifest: Path) -> list[dict]:
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} not found")
    if manifest.suffix == ".csv":
        with manifest.open(newline="") as handle:
            return list(csv.DictReader(handle))
    if manifest.suffix in (".jsonl", ".json"):
        try:
            return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        except ValueError as error:
            raise DataError(f"{manifest}: not JSON lines ({error})") from None
    raise DataError(f"manifest {manifest} must be .csv or .jsonl")


def _label_value(value):
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def sample_key(relative: Path) -> str:
    """WebDataset keys end at the first dot of the file name: keep dots and slashes out."""
    return str(relative.with_suffix("")).replace(os.sep, "__").replace(".", "_")


@dataclass(frozen=True)
class BadSource:
    """A source file that cannot become a sample (returned, not raised, from the worker pool)."""

    path: str
    reason: str
    detail: str

    def line(self) -> str:
        return f"{self.path}: {self.reason}: {self.detail}"


@dataclass(frozen=True)
class Resize:
    """Pre-resizing at write time (FFCV's max_resolution, on the shorter side): an image whose
    shorter side exceeds `max_side` is scaled (antialiased bicubic) to that shorter side and
    re-encoded, JPEG at `quality` (PNG stays PNG, lossless); its original size is kept in the
    sample's `original_size.json` member and its EXIF block is carried over."""

    max_side: int
    quality: int = 90


ORIGINAL_SIZE = "original_size.json"


def _load_record(args: tuple[SourceItem, bool, dict | None, Resize | None]) -> dict | BadSource:
    item, multi_label, class_map, resize = args
    try:
        data = Path(item.path).read_bytes()
    except OSError as error:
        return BadSource(item.path, "unreadable_file", str(error))
    try:
        pixels = decode_image(data)  # refuse unreadable images now, not during training
    except SampleError as error:
        return BadSource(item.path, error.reason, error.detail)
    ext = Path(item.path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
    ids = [class_map[v] if isinstance(v, str) and class_map is not None and v in class_map else v
           for v in item.labels]
    if any(isinstance(i, str) for i in ids):
        return BadSource(item.path, "bad_label", f"label {ids} is a name; pass --class-map with it or use ids")
    if not multi_label and len(ids) != 1:
        return BadSource(item.path, "bad_label", f"{len(ids)} labels; use --multi-label for several per image")
    record = {"__key__": item.key}
    if resize is not None and min(pixels.shape[:2]) > resize.max_side:
        ext, data = shrink(data, pixels, ext, resize)
        record[ORIGINAL_SIZE] = json.dumps({"width": pixels.shape[1], "height": pixels.shape[0]}).encode()
    record[ext] = data
    if multi_label:
        record["json"] = json.dumps(ids).encode()
    else:
        record["cls"] = str(ids[0]).encode()
    return record


def shrink(data: bytes, pixels: np.ndarray, ext: str, resize: Resize) -> tuple[str, bytes]:
    """-> (extension, bytes) of the image scaled to a shorter side of resize.max_side."""
    import io

    from PIL import Image

    height, width = pixels.shape[:2]
    scale = resize.max_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.BICUBIC)  # PIL resize: antialiased
    try:
        exif = Image.open(io.BytesIO(data)).info.get("exif")
    except Exception:
        exif = None
    buffer = io.BytesIO()
    options = {"exif": exif} if exif else {}
    if ext == "png":
        image.save(buffer, format="PNG", compress_level=6, **options)
        return "png", buffer.getvalue()
    image.save(buffer, format="JPEG", quality=resize.quality, **options)
    return "jpg", buffer.getvalue()


SKIPPED_SOURCES = "skipped_sources.jsonl"


def write_from_source(source: Path, out_dir: Path, *, prefix: str, max_count: int, max_bytes: int | None,
                      multi_label: bool, workers: int, class_map: dict | None = None, shuffle: bool = True,
                      seed: int = 0, skip_bad: bool = False,
                      resize: Resize | None = None) -> tuple[str, int, list[BadSource]]:
    """-> (shard pattern, samples written, skipped sources). Shuffled (seeded) by default: a class
    folder listed in order would give one class per shard, and a shuffle buffer cannot undo it.
    A bad source stops the write (nothing is left behind) unless `skip_bad`: then it is listed
    in OUT_DIR/skipped_sources.jsonl and the rest is written. `resize` pre-resizes large images."""
    if source.is_dir():
        items, classes = folder_items(source)
    else:
        items, classes = manifest_items(source), None
    keys = collections.Counter(item.key for item in items)
    duplicates = [k for k, n in keys.items() if n > 1]
    if duplicates:
        raise DataError(f"duplicate sample keys, e.g. {duplicates[0]!r}: give the files distinct names")
    if shuffle:
        items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    skipped: list[BadSource] = []

    def good_records(results):
        for result in results:
            if isinstance(result, BadSource):
                if not skip_bad:
                    raise DataError(f"{result.line()}; nothing was written: fix or remove the file, or pass "
                                    f"--skip-bad to leave such files out (listed in {SKIPPED_SOURCES})")
                skipped.append(result)
                continue
            yield result

    jobs = [(item, multi_label, class_map, resize) for item in items]
    pool = ProcessPoolExecutor(max(1, workers))
    try:
        with tqdm(total=len(items), desc="writing", unit="img") as bar:
            results = pool.map(_load_record, jobs, chunksize=16)  # ordered: deterministic shards
            pattern, _ = write_shards(good_records(results), out_dir, prefix=prefix, max_count=max_count,
                                      max_bytes=max_bytes, progress=bar)
    finally:
        pool.shutdown(cancel_futures=True)  # a stop does not wait for the rest of the decodes
    if classes is not None:
        (out_dir / "classes.json").write_text(json.dumps(classes, indent=1))
    report = out_dir / SKIPPED_SOURCES
    if skipped:
        report.write_text("".join(json.dumps({"path": b.path, "reason": b.reason, "detail": b.detail}) + "\n"
                                  for b in skipped))
    return pattern, len(items) - len(skipped), skipped


# ---------------------------------------------------------------------------------------------
# check: count, decode every image, validate every label.


@dataclass
class ShardReport:
    url: str
    samples: int = 0
    bytes: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (key, reason, detail)
    keys: list[str] = field(default_factory=list)
    images: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, encoded bytes)


def check_shard(args: tuple[str, LabelSpec | None]) -> ShardReport:
    url, labels = args
    report = ShardReport(url, bytes=os.path.getsize(url) if os.path.exists(url) else 0)
    for item in iter_shard(url):
        if not isinstance(item, dict):
            report.problems.append((item.key, item.reason, item.detail))
            report.samples += bool(item.key)
            continue
        report.samples += 1
        report.keys.append(item["__key__"])
        try:
            data = image_bytes(item)
            pixels = decode_image(data)
            report.images.append((pixels.shape[1], pixels.shape[0], len(data)))
            _check_label(item, labels)
        except SampleError as error:
            report.problems.append((item["__key__"], error.reason, error.detail))
    return report


def _check_label(item: dict, labels: LabelSpec | None) -> None:
    if labels is not None:
        decode_target(item, labels)
        return
    if "cls" not in item and "json" not in item:
        raise SampleError("missing_label", "no .cls or .json member")


def size_summary(reports: list[ShardReport], max_side: int) -> list[str]:
    """The decoded images' size distribution and what `shards write --max-side` would change.
    Savings are estimates: JPEG bytes and decode work taken as proportional to the pixel count."""
    images = np.array([image for report in reports for image in report.images], dtype=np.float64).reshape(-1, 3)
    if not len(images):
        return []
    width, height, size = images.T
    shorter = np.minimum(width, height)
    p5, p50, p95 = np.percentile(shorter, [5, 50, 95])
    pixels = width * height
    over = shorter > max_side
    kept = np.where(over, (max_side / shorter) ** 2, 1.0)
    lines = [f"image sizes: shorter side p5 {p5:.0f} / median {p50:.0f} / p95 {p95:.0f} px, median "
             f"{np.median(width):.0f}x{np.median(height):.0f}, {np.mean(pixels) / 1e6:.2f} Mpixel and "
             f"{np.mean(size) / 1e3:.1f} KB per image on average"]
    if over.any():
        lines.append(f"pre-resizing: {over.mean():.0%} of images have a shorter side over {max_side} px; "
                     f"`vitscale shards write --max-side {max_side}` would leave about "
                     f"{(pixels * kept).sum() / pixels.sum():.0%} of the pixels to decode and about "
                     f"{(size * kept).sum() / size.sum():.0%} of the bytes (estimate)")
    else:
        lines.append(f"pre-resizing: no image has a shorter side over {max_side} px; --max-side {max_side} "
                     "would change nothing")
    return lines


def check_shards(spec: str, *, labels: LabelSpec | None, workers: int, allow_shell: bool = False) -> list[ShardReport]:
    urls = expand_shards(spec, allow_shell=allow_shell, key="SHARDS")
    with ProcessPoolExecutor(max(1, workers)) as pool:
        reports = list(tqdm(pool.map(check_shard, [(u, labels) for u in urls]), total=len(urls), desc="checking",
                            unit="shard"))
    seen: dict[str, str] = {}
    for report in reports:
        for key in report.keys:
            if key in seen:
                report.problems.append((key, "duplicate_key", f"also in {shard_name(seen[key])}"))
            seen[key] = report.url
    return reports


def write_check_index(reports: list[ShardReport], path: Path) -> tuple[Path, list[str]]:
    """Update the checked shards' entries of the index (others are kept: checking a subset must
    not drop the rest). -> (path, one line per entry that was stale)."""
    entries = read_index(path)
    stale = []
    for report in reports:
        name = shard_name(report.url)
        old = entries.get(name)
        if old is not None and (old.get("samples"), old.get("bytes")) != (report.samples, report.bytes):
            stale.append(f"{name}: the index said {old.get('samples')} samples / {old.get('bytes')} bytes, "
                         f"the shard has {report.samples} / {report.bytes}: entry updated")
        entries[name] = {"samples": report.samples, "bytes": report.bytes, "problems": len(report.problems)}
    return write_index(path, entries, {"checked": True}), stale


# ---------------------------------------------------------------------------------------------
# plan: who reads what, before a job starts.


def describe_plan(spec: str, *, index: str, world_size: int, workers: int, micro_batch: int,
                  allow_shell: bool, few_shards: str = "rebalance", key: str = "data.train_shards") -> dict:
    """Raises like the loader would when `few_shards` is "refuse" and there are too few shards."""
    urls = expand_shards(spec, allow_shell=allow_shell, key=key)
    topology = planning.Topology(world_size, max(1, workers), micro_batch)
    check_shard_count(len(urls), topology, few_shards, key)
    counts = shard_sample_counts(urls, index).counts
    total = sum(counts)
    steps = planning.steps_for(total, topology)
    readers = world_size * topology.workers
    return {"shards": len(urls), "samples_per_epoch": total, "ranks": world_size, "workers_per_rank": topology.workers,
            "readers": readers, "steps_per_epoch": steps, "padding_samples": steps * world_size * micro_batch - total,
            "samples_per_reader": [r.length for r in planning.readers(steps, topology, 0)],
            "shards_per_reader": len(urls) / readers, "shared_shards": len(urls) < readers,
            "missing_or_empty_shards": [shard_name(u) for u, c in zip(urls, counts)
                                        if c == 0 or not (u.startswith("pipe:") or os.path.exists(u))],
            "index": INDEX_NAME}
