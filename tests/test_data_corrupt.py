"""Corrupt input injected into real shards: each kind is skipped and counted exactly, every good
sample still arrives once, the ledger names the keys, and strict mode stops naming shard and key."""

from __future__ import annotations

import collections
import json
import os
import tarfile

import numpy as np
import pytest

from data_fixtures import digit_records
from vitscale.data import DataConfig, build_train_loader
from vitscale.data.writer import encode_image, write_shards
from vitscale.errors import DataError

EXPECTED = {"undecodable_image": 2, "empty_file": 1, "missing_label": 1, "bad_label": 2, "oversized_image": 1,
            "missing_image": 1, "truncated_member": 1, "missing_shard": 3, "truncated_shard": 1}


def broken_records():
    good = list(digit_records(range(100, 104)))
    jpeg = encode_image(np.full((16, 16, 3), 90, np.uint8), "jpg")
    big = encode_image(np.zeros((120, 120, 3), np.uint8), "png")
    bad = [
        {"__key__": "garbage", "png": os.urandom(300), "cls": b"1"},
        {"__key__": "cut_jpeg", "jpg": jpeg[: len(jpeg) // 2], "cls": b"1"},
        {"__key__": "zero_bytes", "png": b"", "cls": b"1"},
        {"__key__": "no_label", "png": good[0]["png"]},
        {"__key__": "text_label", "png": good[0]["png"], "cls": b"seven"},
        {"__key__": "label_out_of_range", "png": good[0]["png"], "cls": b"99"},
        {"__key__": "too_many_pixels", "png": big, "cls": b"1"},
        {"__key__": "no_image", "cls": b"1"},
    ]
    return [good[0], *bad[:4], good[1], *bad[4:], good[2], good[3]]


def member_offsets(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("broken")
    records = broken_records()
    write_shards(records, out, prefix="a", max_count=100)
    write_shards(digit_records(range(0, 5)), out, prefix="b", max_count=100)  # last member cut mid-data
    write_shards(digit_records(range(5, 8)), out, prefix="c", max_count=100)  # deleted: missing shard
    write_shards(digit_records(range(8, 12)), out, prefix="d", max_count=100)  # cut between samples
    write_shards(digit_records(range(12, 15)), out, prefix="e", max_count=100)
    name, _, data_offset, size = member_offsets(out / "b-000000.tar")[-1]
    os.truncate(out / "b-000000.tar", data_offset + size // 2)
    os.remove(out / "c-000000.tar")
    last_sample_header = member_offsets(out / "d-000000.tar")[-2][1]  # digit_00011.cls
    os.truncate(out / "d-000000.tar", last_sample_header)
    good = [r["__key__"] for r in records if r["__key__"].startswith("digit")]
    good += [f"digit_{i:05d}" for i in (*range(0, 4), *range(8, 11), *range(12, 15))]
    manifest = out / "all.txt"
    manifest.write_text("".join(f"{p}-000000.tar\n" for p in "abcde"))
    return str(manifest), sorted(good), out


def loader(shards, *, rank=0, world=1, workers=0, **kw):
    kw.setdefault("shuffle_buffer", 6)
    cfg = DataConfig(train_shards=shards, num_workers=workers, max_image_pixels=100 * 100, **kw)
    return build_train_loader(cfg, micro_batch_size=4, image_size=16, num_classes=12, rank=rank, world_size=world,
                              seed=1)


def one_epoch(data_loader):
    batches = []
    for batch in data_loader.batches():
        batches.append(batch)
        if data_loader.epoch == 1:
            return batches


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_each_corrupt_kind_is_skipped_and_counted_exactly(broken_shards, tmp_path, world, workers):
    shards, good, _ = broken_shards
    ledger = tmp_path / "ledger"
    totals, seen, steps = collections.Counter(), collections.Counter(), set()
    for rank in range(world):
        data_loader = loader(shards, rank=rank, world=world, workers=workers, skip_ledger=str(ledger))
        batches = one_epoch(data_loader)
        steps.add(len(batches))
        seen.update(k for b in batches for k, v in zip(b.keys, b.valid.tolist()) if v)
        totals.update(data_loader.skipped_samples())
    assert len(steps) == 1
    assert dict(totals) == EXPECTED
    assert sorted(seen) == good and set(seen.values()) == {1}
    records = [json.loads(line) for f in sorted(ledger.iterdir()) for line in f.read_text().splitlines()]
    by_key = {r["key"]: r["reason"] for r in records}
    assert len(records) == sum(EXPECTED.values())
    assert by_key["garbage"] == by_key["cut_jpeg"] == "undecodable_image"
    assert by_key["zero_bytes"] == "empty_file" and by_key["too_many_pixels"] == "oversized_image"
    assert by_key["text_label"] == by_key["label_out_of_range"] == "bad_label"
    assert by_key["no_label"] == "missing_label" and by_key["no_image"] == "missing_image"
    assert by_key["digit_00004"] == "truncated_member"
    assert {r["shard"].rsplit("/", 1)[-1] for r in records if r["reason"] == "missing_shard"} == {"c-000000.tar"}


def test_counts_survive_a_resume(broken_shards):
    shards, _, _ = broken_shards
    first = loader(shards)
    for _ in zip(range(4), first.batches()):
        pass
    before = first.skipped_samples()
    second = loader(shards)
    second.load_state_dict(first.state_dict())
    assert second.skipped_samples() == before
    one_epoch(second)
    assert second.skipped_samples() == EXPECTED


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_mode_stops_naming_shard_and_key(broken_shards, workers):
    shards, _, out = broken_shards
    with pytest.raises(DataError) as raised:
        one_epoch(loader(shards, workers=workers, strict=True, shuffle_shards=False, shuffle_buffer=1))
    message = str(raised.value)
    assert "\n" not in message
    assert "a-000000.tar" in message and "sample garbage" in message and "undecodable_image" in message


def test_oversized_image_is_refused_before_decoding():
    from vitscale.data.decode import SampleError, open_image

    png = encode_image(np.zeros((200, 300, 3), np.uint8), "png")
    with pytest.raises(SampleError) as raised:
        open_image(png, max_pixels=300 * 199)
    assert raised.value.reason == "oversized_image" and "300x200" in raised.value.detail
    assert open_image(png, max_pixels=300 * 200).size == (300, 200)


def test_missing_shard_without_index_is_counted_once_or_stops_strict(tmp_path):
    write_shards(digit_records(range(4)), tmp_path, prefix="x", max_count=2)
    (tmp_path / "_info.json").unlink()
    (tmp_path / "x-000001.tar").unlink()
    pattern = str(tmp_path / "x-{000000..000001}.tar")
    counts = [loader(pattern, rank=r, world=2).skipped_samples() for r in range(2)]
    assert counts == [{"missing_shard": 1}, {}]
    with pytest.raises(DataError, match="x-000001.tar: missing_shard"):
        loader(pattern, strict=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_missing_shard_leaves_holes_not_copies(tmp_path, workers):
    """Finding: with one of five shards missing, batches carried 8-18 copies of one image. Now every
    slot of the missing shard is a hole (zeros, valid=False) and no real sample appears twice."""
    write_shards(digit_records(range(40)), tmp_path, prefix="s", max_count=8)  # 5 shards, indexed
    (tmp_path / "s-000002.tar").unlink()
    pattern = str(tmp_path / "s-{000000..000004}.tar")
    data_loader = build_train_loader(DataConfig(train_shards=pattern, num_workers=workers, shuffle_buffer=16),
                                     micro_batch_size=16, image_size=16, num_classes=12, rank=0, world_size=1,
                                     seed=0)
    batches = one_epoch(data_loader)
    real = [k for b in batches for k, v in zip(b.keys, b.valid.tolist()) if v]
    holes = [(b.images[i], k) for b in batches for i, (k, v) in enumerate(zip(b.keys, b.valid.tolist())) if not v]
    assert len(real) == len(set(real)) == 32
    assert set(real) == {f"digit_{i:05d}" for i in (*range(16), *range(24, 40))}
    # The missing shard's samples by their place in it, then 8 padding slots (48 slots, 40 samples).
    assert sorted(k for _, k in holes) == [""] * 8 + [f"#{i}" for i in range(8)]
    assert all(not image.any() for image, _ in holes)
    assert data_loader.skipped_samples() == {"missing_shard": 8}
