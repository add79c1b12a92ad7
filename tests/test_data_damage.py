"""Damage the index cannot vouch for, hostile labels and image fidelity, on real shards: each is
counted under its own reason by the loader and reported by `vitscale shards check`, or read the way
WebDataset and libpng read it."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_fixtures import digit_records
from vitscale.cli import main
from vitscale.data import DataConfig, build_train_loader
from vitscale.data.decode import Augment, LabelSpec, SampleError, decode_image, decode_target
from vitscale.data.shards import INDEX_NAME, count_samples, iter_shard, shard_name, shard_sample_counts
from vitscale.data.writer import write_shards


def read_epoch(pattern, **cfg):
    """(real keys of one epoch, skip counts) through the training loader, one process."""
    cfg.setdefault("shuffle_buffer", 4)
    data = DataConfig(train_shards=pattern, num_workers=0, **cfg)
    loader = build_train_loader(data, micro_batch_size=4, image_size=16, num_classes=12, rank=0, world_size=1,
                                seed=0)
    keys = []
    for batch in loader.batches():
        keys += [k for k, v in zip(batch.keys, batch.valid.tolist()) if v]
        if loader.epoch == 1:
            break
    return keys, loader.skipped_samples()


def check(pattern, capsys, *extra):
    code = main(["shards", "check", pattern, "--workers", "1", "--num-classes", "12", *extra])
    return code, capsys.readouterr().out


def tar_of(members: list[tuple[str, bytes]], path, *, end_blocks: bool = True) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    if not end_blocks:
        data = data[:sum(512 + -(-len(d) // 512) * 512 for _, d in members)]
    path.write_bytes(data)


def members_of(records):
    return [(f"{r['__key__']}.{ext}", value) for r in records for ext, value in r.items() if not ext.startswith("_")]


@pytest.fixture()
def good_shard(tmp_path):
    """x-000000.tar with digits 0..5 and no index."""
    write_shards(digit_records(range(6)), tmp_path, prefix="x", max_count=6)
    (tmp_path / INDEX_NAME).unlink()
    return tmp_path


def test_not_a_tar_and_empty_shards_are_counted_not_silent(good_shard, capsys):
    (good_shard / "x-000001.tar").write_text("this is not a tar archive\n" * 40)
    (good_shard / "x-000002.tar").write_bytes(b"")
    pattern = str(good_shard / "x-{000000..000002}.tar")
    keys, skipped = read_epoch(pattern)
    assert len(keys) == 6 and skipped == {"not_a_tar": 1, "empty_shard": 1}
    code, out = check(pattern, capsys)
    assert code == 1 and "x-000001.tar: (shard): not_a_tar" in out and "x-000002.tar: (shard): empty_shard" in out


def test_gzip_compressed_shards_are_read_streamed(good_shard):
    plain = good_shard / "x-000000.tar"
    (good_shard / "y-000000.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    assert count_samples(str(good_shard / "y-000000.tar.gz")).samples == 6
    keys, skipped = read_epoch(str(good_shard))  # a directory lists .tar.gz shards too
    assert sorted(keys) == [f"digit_{i:05d}" for i in range(6)] and skipped == {}


def test_cut_on_a_block_boundary_is_truncation_not_a_clean_end(tmp_path, capsys):
    records = list(digit_records(range(6)))
    tar_of(members_of(records), tmp_path / "x-000000.tar", end_blocks=True)
    tar_of(members_of(records[:3]), tmp_path / "x-000001.tar", end_blocks=False)  # 3 of 6 samples, cut
    assert count_samples(str(tmp_path / "x-000000.tar")).problem is None
    counted = count_samples(str(tmp_path / "x-000001.tar"))
    assert counted.samples == 3 and counted.problem.reason == "truncated_shard"
    pattern = str(tmp_path / "x-{000000..000001}.tar")
    keys, skipped = read_epoch(pattern)
    assert len(keys) == 9 and skipped == {"truncated_shard": 1}
    code, out = check(pattern, capsys)
    assert code == 1 and "x-000001.tar: (shard): truncated_shard" in out


def test_dot_slash_member_names_are_read_as_webdataset_reads_them(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for record in digit_records(range(10)):
        for ext, value in record.items():
            if not ext.startswith("_"):
                (source / f"{record['__key__']}.{ext}").write_bytes(value)
    shard = tmp_path / "x.tar"
    subprocess.run(["tar", "--sort=name", "-C", str(source), "-cf", str(shard), "."], check=True)
    import webdataset

    theirs = [s["__key__"] for s in webdataset.WebDataset(str(shard), shardshuffle=False)]
    ours = [s["__key__"] for s in iter_shard(str(shard)) if isinstance(s, dict)]
    assert len(ours) == 10 and sorted(ours) == sorted(theirs)
    assert count_samples(str(shard)).samples == 10


def test_stale_index_never_drops_samples(tmp_path, capsys):
    write_shards(digit_records(range(4)), tmp_path, prefix="x", max_count=8)
    stale = json.loads((tmp_path / INDEX_NAME).read_text())
    write_shards(digit_records(range(8)), tmp_path, prefix="x", max_count=8)  # the shard grows, then
    (tmp_path / INDEX_NAME).write_text(json.dumps(stale))                    # the old index comes back
    keys, skipped = read_epoch(str(tmp_path / "x-000000.tar"))
    assert len(keys) == 8 and skipped == {"stale_index": 1}
    assert "index says 4 samples" in capsys.readouterr().out


def test_checking_a_subset_keeps_the_rest_of_the_index(tmp_path, capsys):
    write_shards(digit_records(range(12)), tmp_path, prefix="x", max_count=4)  # three shards
    code, out = check(str(tmp_path / "x-000001.tar"), capsys)
    assert code == 0
    entries = json.loads((tmp_path / INDEX_NAME).read_text())["shards"]
    assert sorted(entries) == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    entries["x-000002.tar"]["samples"] = 3  # a stale entry: flagged and corrected by a check of it
    (tmp_path / INDEX_NAME).write_text(json.dumps({"shards": entries}))
    code, out = check(str(tmp_path / "x-000002.tar"), capsys)
    assert "stale index entry: x-000002.tar: the index said 3 samples" in out
    assert json.loads((tmp_path / INDEX_NAME).read_text())["shards"]["x-000002.tar"]["samples"] == 4


def test_deeply_nested_label_is_a_bad_label_not_a_crash(tmp_path, capsys):
    records = list(digit_records(range(4)))
    records[1]["cls"] = b"[" * 100_000
    records[2]["cls"] = b"1" * 5000
    write_shards(records, tmp_path, prefix="x", max_count=4)
    keys, skipped = read_epoch(str(tmp_path / "x-000000.tar"))
    assert len(keys) == 2 and skipped == {"bad_label": 2}
    code, out = check(str(tmp_path / "x-000000.tar"), capsys)
    assert code == 1 and out.count("bad_label") == 3 and "Traceback" not in out  # two lines + the summary
    spec = LabelSpec(5, True)
    assert decode_target({"json": b'{"labels": [1, "[[[[[[[["]}'.replace(b'"[[[[[[[["', b"2")}, spec)[2] == 1
    with pytest.raises(SampleError, match="nests deeper"):
        decode_target({"json": b"[[[[[[1]]]]]]"}, spec)


def test_repeated_and_escaping_members_are_reported(tmp_path, capsys):
    first, second, third = digit_records(range(3))
    clash = dict(second, __key__=first["__key__"])  # the same key twice in a row: two samples merged
    members = members_of([first, clash, third]) + [("../escape.png", third["png"])]
    tar_of(members, tmp_path / "x-000000.tar")
    items = list(iter_shard(str(tmp_path / "x-000000.tar")))
    reasons = [getattr(i, "reason", "sample") for i in items]
    assert reasons == ["duplicate_key", "unsafe_member", "sample"]  # the note comes before the slot it is
    keys, skipped = read_epoch(str(tmp_path / "x-000000.tar"))      # read with: counted once, by its reader
    assert keys == [third["__key__"]] and skipped == {"duplicate_key": 1, "unsafe_member": 1}
    code, out = check(str(tmp_path / "x-000000.tar"), capsys)
    assert code == 1 and "duplicate_key" in out and "unsafe_member" in out and "../escape.png" in out


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # mode I;16
    pixels = decode_image(buffer.getvalue())
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(pixels[..., 0], expected)
    assert (pixels == 255).mean() < 0.01


def test_exif_orientation_ignored_by_default_applied_on_request():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=100, exif=exif)
    as_stored = Augment(20, train=False)(buffer.getvalue(), 0)
    upright = Augment(20, train=False, apply_exif_orientation=True)(buffer.getvalue(), 0)
    # Centre crop of the short side: stored, the crop is half white at the left; upright (40 x 20
    # turned to 20 x 40), the crop spans rows 10..30 of a top-white image: white on top.
    assert as_stored[:, :, :5].float().mean() > 200 and as_stored[:, :, -5:].float().mean() < 50
    assert upright[:, :5].float().mean() > 200 and upright[:, -5:].float().mean() < 50


def test_images_over_pils_bomb_limit_are_oversized():
    from PIL import PngImagePlugin  # noqa: F401  (registers PNG)

    header = io.BytesIO()
    Image.new("L", (20000, 10000)).save(header, format="PNG")  # 200 MP: over PIL's own 179 MP error limit
    augment = Augment(16, train=False, max_pixels=8192 * 8192)
    with pytest.raises(SampleError) as raised:
        augment(header.getvalue(), 0)
    assert raised.value.reason == "oversized_image"


def test_pipe_urls_are_indexed_by_the_shard_they_name(tmp_path):
    assert shard_name("pipe:aws s3 cp s3://bucket/train-000123.tar -") == "train-000123.tar"
    assert shard_name("pipe:curl -s https://host/data/eval-000001.tar.gz | cat") == "eval-000001.tar.gz"
    write_shards(digit_records(range(5)), tmp_path, prefix="x", max_count=5)
    url = f"pipe:cat {tmp_path / 'x-000000.tar'} -"
    assert shard_sample_counts([url], str(tmp_path / INDEX_NAME)).counts == [5]
    keys, skipped = read_epoch(url, allow_shell=True, index=str(tmp_path / INDEX_NAME))
    assert len(keys) == 5 and skipped == {}
