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
    assert [json.loads(s["json"]) for s in samples] == [[0, 5], [1, 5]]


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
                              "--repeats", "1", "--output", str(out)])
    assert bench.run(args) == 0
    result = json.loads(out.read_text())["sizes"]["imagenet"]
    assert result["baseline_images_per_second"] > 0 and result["vitscale_images_per_second"] > 0
    assert "torchvision ImageFolder" in capsys.readouterr().out


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
