"""Data benchmark: images/s per core of the shard pipeline (decode + augment + batch) against a
plain torchvision ImageFolder pipeline with the same transforms, on the same JPEGs, in one run.

    vitscale bench data --image-size 224 --images 256 --output runs/bench_data.json
    python -m vitscale.data.bench --image-size 224          # standalone

The JPEGs are crops and rescalings of scikit-learn's two sample photos (real photographs),
written at ImageNet-like sizes (~500x375) and at larger sizes (~1024x768). Both pipelines run in
this process on one thread, timed in CPU seconds (images/s per core, robust to other load on the
machine); they see the same crop-scale and ratio ranges, flip, normalisation and batch size.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = {"imagenet": ((500, 375), (400, 350)), "large": ((1024, 768), (1280, 960))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=224, help="output resolution (default 224)")
    parser.add_argument("--images", type=int, default=192, help="JPEGs per size class (default 192)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", default="imagenet,large", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the test images")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians reported")
    parser.add_argument("--workdir", default="", help="where to write the JPEGs (default: a temp dir)")
    parser.add_argument("--output", default="", help="write the results as JSON here")


def run(args) -> int:
    torch.set_num_threads(1)  # per-core numbers: one process, one thread
    results = {"image_size": args.image_size, "images": args.images, "batch_size": args.batch_size,
               "threads": 1, "clock": "process CPU time", "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for size_name in args.sizes.split(","):
            folder, shards = write_bench_jpegs(root / size_name, SIZES[size_name.strip()], args.images, args.quality)
            baselines, ours_runs = [], []
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                baselines.append(time_imagefolder(folder, args.image_size, args.batch_size))
                ours_runs.append(time_shards(shards, args.image_size, args.batch_size))
            baseline, ours = float(np.median(baselines)), float(np.median(ours_runs))
            entry = {"jpeg_sizes": [list(s) for s in SIZES[size_name]], "baseline_images_per_second": baseline,
                     "vitscale_images_per_second": ours, "speedup": ours / baseline,
                     "baseline_runs": baselines, "vitscale_runs": ours_runs}
            results["sizes"][size_name] = entry
            print(f"{size_name:9s} JPEGs {' / '.join('x'.join(map(str, s)) for s in SIZES[size_name])} -> "
                  f"{args.image_size}px: torchvision ImageFolder {baseline:7.1f} img/s/core, "
                  f"vitscale shards {ours:7.1f} img/s/core, {ours / baseline:.2f}x")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
        print(f"results: {args.output}")
    return 0


def write_bench_jpegs(out: Path, sizes, count: int, quality: int) -> tuple[Path, str]:
    """The same JPEG bytes as an ImageFolder tree (out/folder/CLASS/*.jpg) and as shards."""
    from vitscale.data.datasets import sample_photos
    from vitscale.data.writer import write_shards

    rng = np.random.default_rng(0)
    photos = sample_photos()
    records = []
    for i in range(count):
        name, pixels = photos[i % len(photos)]
        width, height = sizes[i % len(sizes)]
        data = _variant(pixels, width, height, rng, quality)
        path = out / "folder" / name / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        records.append({"__key__": f"{name}_{i:05d}", "jpg": data, "cls": str(i % len(photos)).encode()})
    pattern, _ = write_shards(records, out / "shards", prefix="bench", max_count=64)
    return out / "folder", pattern


def _variant(pixels: np.ndarray, width: int, height: int, rng, quality: int) -> bytes:
    """A random crop of the photo (60-100% of each side) rescaled to width x height, as JPEG."""
    h, w = pixels.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image = Image.fromarray(pixels[top:top + ch, left:left + cw]).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def time_imagefolder(folder: Path, image_size: int, batch_size: int) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    return _images_per_second(iter(loader), len(dataset) // batch_size, batch_size)


def time_shards(pattern: str, image_size: int, batch_size: int) -> float:
    from vitscale.data.config import DataConfig
    from vitscale.data.loader import build_train_loader

    cfg = DataConfig(train_shards=pattern, num_workers=0, shuffle_buffer=256, pin_memory=False)
    loader = build_train_loader(cfg, micro_batch_size=batch_size, image_size=image_size, num_classes=2, rank=0,
                                world_size=1, seed=0)
    return _images_per_second(iter(loader), loader.steps_per_epoch, batch_size)


def _images_per_second(batches, count: int, batch_size: int) -> float:
    """Images per CPU-second of this process (one thread): per-core throughput that other load
    on the machine does not distort the way wall-clock time would."""
    next(batches)  # warm-up: imports, first shard open
    start = time.process_time()
    for _ in range(count - 1):
        next(batches)
    return (count - 1) * batch_size / (time.process_time() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
