"""Data benchmark: images/s per core of the shard pipeline (decode + augment + batch) against a
plain torchvision ImageFolder pipeline with the same transforms, on the same JPEGs, in one run.

    vitscale bench data --image-size 224 --images 256 --output runs/bench_data.json
    vitscale bench data --model B/16 --gpu h100 --mfu 0.4       # + the cores that model needs
    python -m vitscale.data.bench --image-size 224              # standalone

The JPEGs are crops and rescalings of scikit-learn's two sample photos (real photographs),
written at ImageNet-like sizes (~500x375) and at larger sizes (~1024x768). Measured on them:
torchvision's ImageFolder path (the baseline), vitscale's shards with each JPEG decoder
(simplejpeg, the default, and PIL), and vitscale on the same images pre-resized by
`shards write --max-side` (256 by default). Every pipeline runs in this process on one thread,
timed in CPU seconds (images/s per core, robust to other load on the machine), alternating
repeats; they see the same crop-scale and ratio ranges, flip, normalisation and batch size.
With --model, the images/s one GPU consumes at --mfu (training FLOPs per image from the MFU
accounting, datasheet peak) and the cores per GPU each pipeline would need.
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
    parser.add_argument("--max-side", type=int, default=256, help="shorter side of the pre-resized shards (0: skip)")
    parser.add_argument("--model", default="", help="a model name (B/16, H/14, ...): images/s one GPU needs")
    parser.add_argument("--gpu", default="h100", help="GPU for --model (a name bench/peaks.py knows)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for --model")
    parser.add_argument("--precision", default="bf16", help="precision of the peak for --model")


def pipelines(args) -> dict:
    """name -> (timing function(folder, shards, resized shards) -> img/s), the baseline first."""
    size, batch = args.image_size, args.batch_size
    chosen = {"torchvision ImageFolder": lambda folder, shards, resized: time_imagefolder(folder, size, batch),
              "vitscale simplejpeg": lambda folder, shards, resized: time_shards(shards, size, batch, "simplejpeg"),
              "vitscale pil": lambda folder, shards, resized: time_shards(shards, size, batch, "pil")}
    if args.max_side:
        chosen[f"vitscale simplejpeg, --max-side {args.max_side}"] = (
            lambda folder, shards, resized: time_shards(resized, size, batch, "simplejpeg"))
    return chosen


def model_demand(args) -> dict | None:
    """Images/s one GPU consumes training args.model at args.mfu of its datasheet peak."""
    if not args.model:
        return None
    from vitscale.bench.peaks import TERA, lookup_peak_tflops
    from vitscale.model import ModelConfig
    from vitscale.model.flops import training_flops_per_image

    peak = lookup_peak_tflops(args.gpu, args.precision)
    if peak is None:
        from vitscale.errors import ConfigError

        raise ConfigError("--gpu", f"no datasheet peak for {args.gpu!r} in {args.precision}",
                          "name a GPU bench/peaks.py knows (h100, h200, a100, ...)")
    model = ModelConfig(name=args.model, image_size=args.image_size)
    model.validate()
    flops = training_flops_per_image(model)
    return {"model": args.model, "gpu": args.gpu, "mfu": args.mfu, "precision": args.precision,
            "training_flops_per_image": flops,
            "images_per_second_per_gpu": args.mfu * peak * TERA / flops}


def run(args) -> int:
    torch.set_num_threads(1)  # per-core numbers: one process, one thread
    demand = model_demand(args)
    chosen = pipelines(args)
    results = {"image_size": args.image_size, "images": args.images, "batch_size": args.batch_size,
               "threads": 1, "clock": "process CPU time", "pipelines": list(chosen), "demand": demand, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for size_name in args.sizes.split(","):
            size_name = size_name.strip()
            folder, shards = write_bench_jpegs(root / size_name, SIZES[size_name], args.images, args.quality)
            resized = resized_shards(shards, root / size_name / "resized", args.max_side) if args.max_side else None
            runs = {name: [] for name in chosen}
            for _ in range(args.repeats):  # alternate, so all see the same machine load
                for name, timed in chosen.items():
                    runs[name].append(timed(folder, shards, resized))
            rates = {name: float(np.median(values)) for name, values in runs.items()}
            baseline = rates["torchvision ImageFolder"]
            entry = {"jpeg_sizes": [list(s) for s in SIZES[size_name]], "baseline_images_per_second": baseline,
                     "vitscale_images_per_second": rates["vitscale simplejpeg"],
                     "speedup": rates["vitscale simplejpeg"] / baseline,
                     "images_per_second": rates, "ratio_to_baseline": {n: r / baseline for n, r in rates.items()},
                     "runs": runs}
            results["sizes"][size_name] = entry
            print(f"{size_name} JPEGs {' / '.join('x'.join(map(str, s)) for s in SIZES[size_name])} -> "
                  f"{args.image_size}px, one core:")
            for name, rate in rates.items():
                line = f"  {name:34s} {rate:7.1f} img/s/core  {rate / baseline:5.2f}x"
                if demand:
                    line += f"  {demand['images_per_second_per_gpu'] / rate:5.1f} cores per GPU"
                print(line)
    if demand:
        print(f"{demand['model']} at {args.image_size}px on one {demand['gpu']} at MFU {demand['mfu']:.2f} "
              f"({demand['training_flops_per_image'] / 1e9:.1f} GFLOP per training image): "
              f"{demand['images_per_second_per_gpu']:,.0f} img/s per GPU")
    try:
        import nvidia.dali  # noqa: F401
        print("DALI is installed but not benchmarked here")
    except ImportError:
        pass
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


def resized_shards(pattern: str, out: Path, max_side: int) -> str:
    """The benchmark shards rewritten as `shards write --max-side` writes them."""
    from vitscale.data.decode import decode_image
    from vitscale.data.shard_tools import ORIGINAL_SIZE, Resize, shrink
    from vitscale.data.shards import expand_shards, iter_shard
    from vitscale.data.writer import write_shards

    records = []
    for url in expand_shards(pattern, allow_shell=False, key="bench"):
        for sample in iter_shard(url):
            pixels = decode_image(sample["jpg"])
            record = {"__key__": sample["__key__"], "cls": sample["cls"]}
            if min(pixels.shape[:2]) > max_side:
                _, record["jpg"] = shrink(sample["jpg"], pixels, "jpg", Resize(max_side))
                record[ORIGINAL_SIZE] = json.dumps({"width": pixels.shape[1], "height": pixels.shape[0]}).encode()
            else:
                record["jpg"] = sample["jpg"]
            records.append(record)
    resized, _ = write_shards(records, out, prefix="bench", max_count=64)
    return resized


def time_shards(pattern: str, image_size: int, batch_size: int, jpeg_decoder: str = "simplejpeg") -> float:
    from vitscale.data.config import DataConfig
    from vitscale.data.loader import build_train_loader

    cfg = DataConfig(train_shards=pattern, num_workers=0, shuffle_buffer=256, pin_memory=False,
                     jpeg_decoder=jpeg_decoder)
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
