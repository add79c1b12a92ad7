"""Shards written from real images round-trip (pixels and labels equal the source), and the
`vitscale shards write|check|plan` commands on real folders, manifests and damaged shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitscale.cli import main
from vitscale.data import DataConfig, build_eval_loader
from vitscale.data.datasets import digits_split, sample_photos
from vitscale.data.decode import decode_image, image_bytes
from vitscale.data.shards import expand_shards, iter_shard


def read_all(pattern):
    return [s for url in expand_shards(pattern, allow_shell=False) for s in iter_shard(url)]


def test_digits_shards_round_trip_pixels_and_labels(digits_shards, digits_pixels):
    train, held_out = digits_shards
    images, labels = digits_pixels
    train_ids, eval_ids = digits_split(labels)
    for pattern, ids in ((train, train_ids), (held_out, eval_ids)):
        samples = read_all(pattern)
        assert [s["__key__"] for s in samples] == [f"digit_{i:05d}" for i in ids]
        for sample in samples:
            i = int(sample["__key__"].split("_")[1])
            assert int(sample["cls"]) == labels[i]
            np.testing.assert_array_equal(decode_image(image_bytes(sample)), images[i])
    assert not set(train_ids) & set(eval_ids) and len(train_ids) + len(eval_ids) == len(labels)


def test_eval_loader_returns_the_source_pixels(digits_shards, digits_pixels):
    _, held_out = digits_shards
    images, labels = digits_pixels
    loader = build_eval_loader(DataConfig(eval_shards=held_out, num_workers=0), micro_batch_size=64, image_size=32,
                               num_classes=10, rank=0, world_size=1)
    for batch in loader.batches():
        pixels = torch.round((batch.images * 0.5 + 0.5) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for key, got, target, valid in zip(batch.keys, pixels, batch.targets, batch.valid):
            if not valid:  # padding: a hole, never a copy of a real image
                assert key == "" and not batch.images[batch.keys.index(key)].any()
                continue
            i = int(key.split("_")[1])
            np.testing.assert_array_equal(got, images[i])
            assert int(target) == labels[i]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """ROOT/CLASS/file: the sample photos as lossless PNG and as their original JPEG bytes."""
    root = tmp_path_factory.mktemp("photos")
    sources = {}
    for name, pixels in sample_photos():
        (root / name).mkdir()
        Image.fromarray(pixels).save(root / name / f"{name}.png")
        Image.fromarray(pixels[:350, :400]).save(root / name / f"{name}.crop.png")
        Image.fromarray(pixels).save(root / name / f"{name}_q90.jpg", quality=90)
        sources[name] = pixels
    return root, sources


def test_shards_write_from_folder_round_trips_real_photos(photo_folder, tmp_path, capsys):
    root, sources = photo_folder
    out = tmp_path / "shards"
    assert main(["shards", "write", str(root), str(out), "--prefix", "photos", "--max-count", "4",
                 "--workers", "2"]) == 0
    classes = json.loads((out / "classes.json").read_text())
    assert classes == sorted(sources)
    samples = read_all(str(out))
    assert len(samples) == 6 and json.loads((out / "_info.json").read_text())["total_samples"] == 6
    assert [len(list(iter_shard(str(p)))) for p in sorted(out.glob("*.tar"))] == [4, 2]
    for sample in samples:
        class_name = classes[int(sample["cls"])]
        assert sample["__key__"].startswith(f"{class_name}__{class_name}")
        if "png" in sample:
            expected = sources[class_name][:350, :400] if "crop" in sample["__key__"] else sources[class_name]
            np.testing.assert_array_equal(decode_image(sample["png"]), expected)
        else:  # JPEG bytes are stored unchanged
            assert sample["jpg"] == (root / class_name / f"{class_name}_q90.jpg").read_bytes()
    assert main(["shards", "check", str(out), "--num-classes", "2", "--workers", "2"]) == 0
    assert "6 samples, 0 problems" in capsys.readouterr().out


def test_shards_write_from_jsonl_manifest_with_multi_labels(photo_folder, tmp_path):
    root, sources = photo_folder
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(root / n / f"{n}.png"), "labels": [i, 5]}) + "\n"
                                for i, n in enumerate(sorted(sources))))
    out = tmp_path / "ml"
    assert main(["shards", "write", str(manifest), str(out), "--multi-label", "--workers", "1"]) == 0
    samples = read_all(str(out))
    assert sorted(json.loads(s["json"]) for s in samples) == [[0, 5], [1, 5]]


def test_shards_write_rejects_a_broken_manifest(tmp_path, capsys):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,label\nmissing.png,\n")
    assert main(["shards", "write", str(manifest), str(tmp_path / "o")]) == 2
    assert "needs a path and a label" in capsys.readouterr().err


def test_shards_check_reports_damage_and_exits_nonzero(tmp_path, capsys):
    from data_fixtures import digit_records
    from vitscale.data.writer import write_shards

    records = list(digit_records(range(3)))
    records[1]["png"] = b"not an image"
    records[2]["cls"] = b"42"
    write_shards(records, tmp_path, prefix="bad", max_count=10)
    (tmp_path / "_info.json").unlink()
    assert main(["shards", "check", str(tmp_path), "--num-classes", "10", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "digit_00001: undecodable_image" in out and "digit_00002: bad_label" in out
    index = json.loads((tmp_path / "_info.json").read_text())
    assert index["shards"]["bad-000000.tar"]["samples"] == 3 and index["shards"]["bad-000000.tar"]["problems"] == 2


def test_shards_plan_refuses_or_rebalances_too_few_shards(uneven_shards, capsys):
    shards, _ = uneven_shards
    args = ["shards", "plan", "--config", "configs/vit_b16_i21k_tiny.yaml", "--world-size", "2",
            f"data.train_shards={shards}", "data.num_workers=4", "engine.micro_batch_size=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "steps_per_epoch: 5" in out and "padding_samples: 0" in out and "rebalanced: 5 shards < 8" in out
    assert main(args + ["data.few_shards=refuse"]) == 2
    assert "5 shards for 2 ranks x 4 workers" in capsys.readouterr().err


def test_data_benchmark_runs_both_pipelines_and_writes_json(tmp_path, capsys):
    """Smoke test only: benchmarks are never timed assertions."""
    from vitscale.data import bench

    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--images", "8", "--batch-size", "4", "--image-size", "32", "--sizes", "imagenet",
                              "--repeats", "1", "--output", str(out), "--max-side", "200", "--model", "B/16"])
    assert bench.run(args) == 0
    saved = json.loads(out.read_text())
    result = saved["sizes"]["imagenet"]
    assert set(result["images_per_second"]) == {"torchvision ImageFolder", "vitscale simplejpeg", "vitscale pil",
                                                "vitscale simplejpeg, --max-side 200"}
    assert all(rate > 0 for rate in result["images_per_second"].values())
    assert result["ratio_to_baseline"]["torchvision ImageFolder"] == 1.0
    # B/16 at 32 px: 4 patches + [class]; the demand follows the FLOPs table and H100's 989 TFLOP/s.
    from vitscale.model import ModelConfig
    from vitscale.model.flops import training_flops_per_image

    flops = training_flops_per_image(ModelConfig(name="B/16", image_size=32))
    assert saved["demand"]["images_per_second_per_gpu"] == pytest.approx(0.4 * 989e12 / flops)
    printed = capsys.readouterr().out
    assert "torchvision ImageFolder" in printed and "cores per GPU" in printed


def test_shards_write_by_bytes_is_deterministic(photo_folder, tmp_path):
    root, _ = photo_folder
    budget = 1_200_000
    outputs = []
    for run in ("one", "two"):
        out = tmp_path / run
        assert main(["shards", "write", str(root), str(out), "--max-bytes", str(budget), "--workers", "2"]) == 0
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))})
    assert outputs[0] == outputs[1] and len(outputs[0]) > 1
    tar_blocking = 10240  # tar pads the archive end to 20 blocks of 512 bytes
    assert all(len(data) <= budget + tar_blocking for data in outputs[0].values())


@pytest.fixture(scope="module")
def ten_class_folder(tmp_path_factory):
    """ROOT/CLASS/IMAGE.png: 40 digits of each of 10 classes, listed class by class."""
    from vitscale.data.datasets import digits_arrays

    root = tmp_path_factory.mktemp("classes")
    images, labels = digits_arrays(16)
    for digit in range(10):
        (root / f"class{digit}").mkdir()
        for i in np.flatnonzero(labels == digit)[:40]:
            Image.fromarray(images[i]).save(root / f"class{digit}" / f"d{i:05d}.png")
    return root


def mean_distinct_classes(label_stream, micro: int) -> float:
    batches = [label_stream[i:i + micro] for i in range(0, len(label_stream) - micro + 1, micro)]
    return float(np.mean([len(set(b)) for b in batches]))


def test_shards_write_mixes_classes_like_a_uniform_shuffle(ten_class_folder, tmp_path):
    """Finding: a class folder written in listing order gave one class per shard, 8.2 distinct
    classes per 32-sample micro-batch instead of 22.3. The default write is shuffled (seeded)."""
    from vitscale.data import DataConfig, build_train_loader

    out = tmp_path / "mixed"
    assert main(["shards", "write", str(ten_class_folder), str(out), "--max-count", "40", "--workers", "2"]) == 0
    loader = build_train_loader(DataConfig(train_shards=str(out), num_workers=0, shuffle_buffer=16),
                                micro_batch_size=16, image_size=16, num_classes=10, rank=0, world_size=1, seed=0)
    stream = []
    for batch in loader.batches():
        stream += batch.targets[batch.valid].tolist()
        if loader.epoch == 1:
            break
    assert len(stream) == 400
    uniform = np.mean([mean_distinct_classes(list(np.random.default_rng(s).permutation(stream)), 16)
                       for s in range(20)])
    assert abs(mean_distinct_classes(stream, 16) - uniform) <= 0.1 * uniform
    in_order = tmp_path / "in_order"
    assert main(["shards", "write", str(ten_class_folder), str(in_order), "--max-count", "40", "--workers", "2",
                 "--no-shuffle"]) == 0
    first = [int(s["cls"]) for s in iter_shard(str(in_order / "shard-000000.tar"))]
    assert first == [0] * 40  # what the default used to write: one class per shard


def test_shards_write_names_a_bad_source_and_leaves_nothing(ten_class_folder, tmp_path, capsys):
    """Finding: one undecodable image aborted with a 48-line BrokenProcessPool traceback that did
    not name the file, leaving partial output."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(ten_class_folder, root)
    (root / "class3" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"an earlier shard of the same name")
    assert main(["shards", "write", str(root), str(out), "--max-count", "40", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "class3/broken.png: undecodable_image" in err and "nothing was written" in err
    messages = [line for line in err.replace("\r", "\n").splitlines() if line and not line.startswith("writing:")]
    assert len(messages) == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert (out / "shard-000000.tar").read_bytes() == b"an earlier shard of the same name"
    assert main(["shards", "write", str(root), str(out), "--max-count", "40", "--workers", "2", "--skip-bad"]) == 0
    assert "left out 1 bad source files" in capsys.readouterr().out
    report = [json.loads(line) for line in (out / "skipped_sources.jsonl").read_text().splitlines()]
    assert [(r["path"].endswith("class3/broken.png"), r["reason"]) for r in report] == [(True, "undecodable_image")]
    assert json.loads((out / "_info.json").read_text())["total_samples"] == 400


def test_shards_write_max_side_pre_resizes_large_images_only(tmp_path, capsys):
    photo = dict(sample_photos())["china"]                              # 427 x 640 real photograph
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # stored rotated: the loader's business
    Image.fromarray(photo).save(root / "a" / "big.jpg", quality=95, exif=exif)
    Image.fromarray(photo[:300, :500]).save(root / "b" / "wide.png")
    Image.fromarray(photo[:200, :120]).save(root / "b" / "small.jpg", quality=90)
    out = tmp_path / "shards"
    assert main(["shards", "write", str(root), str(out), "--max-side", "256", "--quality", "90",
                 "--workers", "1"]) == 0
    samples = {s["__key__"]: s for s in read_all(str(out))}
    big, wide, small = samples["a__big"], samples["b__wide"], samples["b__small"]
    assert small["jpg"] == (root / "b" / "small.jpg").read_bytes() and "original_size.json" not in small
    assert json.loads(big["original_size.json"]) == {"width": 640, "height": 427}
    assert json.loads(wide["original_size.json"]) == {"width": 500, "height": 300}
    assert Image.open(__import__("io").BytesIO(big["jpg"])).getexif().get(0x0112) == 6
    # Against torchvision's antialiased bicubic resize of the decoded original (an independent
    # resampler): PNG stays lossless, so only resampler differences remain; JPEG adds re-encoding.
    from torchvision.transforms.v2.functional import resize

    for sample, ext, source, size, tolerance in ((big, "jpg", root / "a" / "big.jpg", (256, 384), 3.0),
                                                 (wide, "png", root / "b" / "wide.png", (256, 427), 1.0)):
        pixels = decode_image(sample[ext])
        assert pixels.shape[:2] == size
        original = torch.from_numpy(np.array(decode_image(source.read_bytes()))).permute(2, 0, 1)
        expected = resize(original, list(size), antialias=True,
                          interpolation=__import__("torchvision").transforms.InterpolationMode.BICUBIC)
        error = np.abs(pixels.astype(np.float64) - expected.permute(1, 2, 0).numpy()).mean()
        assert error < tolerance, (ext, error)
    # The loader reads them; check reports the size distribution and what --max-side would save.
    loader = build_eval_loader(DataConfig(eval_shards=str(out), num_workers=0), micro_batch_size=4, image_size=32,
                               num_classes=2, rank=0, world_size=1)
    assert sorted(key for batch in loader.batches() for key, valid in zip(batch.keys, batch.valid) if valid) == \
        ["a__big", "b__small", "b__wide"]
    capsys.readouterr()
    assert main(["shards", "check", str(root.parent / "shards"), "--num-classes", "2", "--workers", "1",
                 "--max-side", "128"]) == 0
    report = capsys.readouterr().out
    assert "shorter side p5" in report and "median 256" in report
    assert "67% of images have a shorter side over 128 px" in report


def test_shards_write_max_side_must_be_positive(tmp_path, capsys):
    assert main(["shards", "write", str(tmp_path), str(tmp_path / "o"), "--max-side", "0"]) == 2
    assert "--max-side must be a positive" in capsys.readouterr().err
