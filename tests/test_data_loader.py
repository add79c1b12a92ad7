"""Loader behaviour on real shards: exact split over simulated ranks and workers, equal batch
counts, exact resume (same and changed topology), labels, AugReg options, shell URLs."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from data_fixtures import digit_records, write_uneven_shards
from vitscale.data import DataConfig, build_eval_loader, build_train_loader
from vitscale.data.datasets import digits_arrays
from vitscale.data.writer import write_shards
from vitscale.errors import ConfigError, DataError

MICRO = 4


def make_loader(shards, *, rank, world, workers, buffer=8, seed=3, share=None, **cfg):
    data = DataConfig(train_shards=shards, num_workers=workers, shuffle_buffer=buffer, **cfg)
    data.validate()
    return build_train_loader(data, micro_batch_size=MICRO, image_size=16, num_classes=12, rank=rank,
                              world_size=world, seed=seed, share=share)


def take(loader, count):
    batches = []
    for batch in loader.batches():
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def epoch_of_all_ranks(shards, world, workers, **kw):
    """{rank: list of batches of one epoch}; every rank reports its steps_per_epoch."""
    out = {}
    for rank in range(world):
        loader = make_loader(shards, rank=rank, world=world, workers=workers, **kw)
        out[rank] = take(loader, loader.steps_per_epoch)
    return out


def assert_exactly_once(per_rank, all_keys, world):
    steps = {rank: len(batches) for rank, batches in per_rank.items()}
    assert len(set(steps.values())) == 1, f"unequal batch counts per rank: {steps}"
    real = collections.Counter(key for batches in per_rank.values() for b in batches
                               for key, valid in zip(b.keys, b.valid.tolist()) if valid)
    assert sorted(real) == sorted(all_keys) and set(real.values()) == {1}
    slots = sum(len(b.keys) for batches in per_rank.values() for b in batches)
    assert slots - len(all_keys) < world * MICRO  # padding below one global batch


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 0)])
def test_every_key_exactly_once_per_epoch_and_equal_steps(uneven_shards, world, workers):
    shards, keys = uneven_shards
    per_rank = epoch_of_all_ranks(shards, world, workers)
    assert_exactly_once(per_rank, keys, world)
    for batches in per_rank.values():
        for batch in batches:
            assert batch.images.shape == (MICRO, 3, 16, 16) and batch.images.dtype == torch.float32
            assert batch.targets.dtype == torch.int64 and batch.targets.shape == (MICRO,)


def test_next_epoch_reshuffles_and_stays_exact(uneven_shards):
    shards, keys = uneven_shards
    loader = make_loader(shards, rank=0, world=1, workers=0)
    steps = loader.steps_per_epoch
    batches = take(loader, 2 * steps)
    first = [k for b in batches[:steps] for k, v in zip(b.keys, b.valid.tolist()) if v]
    second = [k for b in batches[steps:] for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert sorted(first) == sorted(second) == sorted(keys)
    assert first != second
    assert loader.state_dict()["epoch"] == 2


def test_labels_match_the_source_digits(uneven_shards):
    shards, _ = uneven_shards
    _, labels = digits_arrays(16)
    for batch in take(make_loader(shards, rank=0, world=1, workers=0), 3):
        expected = [labels[int(k.split("_")[1])] for k in batch.keys]
        assert batch.targets.tolist() == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_in_the_same_order(uneven_shards, workers):
    shards, _ = uneven_shards
    full = make_loader(shards, rank=1, world=2, workers=workers)
    reference = take(full, full.steps_per_epoch + 2)  # crosses into the next epoch
    stopped = make_loader(shards, rank=1, world=2, workers=workers)
    head = take(stopped, 3)
    state = json.loads(json.dumps(stopped.state_dict()))  # must survive JSON
    resumed = make_loader(shards, rank=1, world=2, workers=workers)
    resumed.load_state_dict(state)
    tail = take(resumed, len(reference) - 3)
    combined = head + tail
    assert [b.keys for b in combined] == [b.keys for b in reference]
    for got, want in zip(combined, reference):  # same crops and flips too
        torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)


def test_resume_with_another_world_size_sees_the_rest_of_the_epoch_once(uneven_shards):
    shards, keys = uneven_shards
    seen = collections.Counter()
    states = []
    for rank in range(2):  # 2 ranks x 2 workers stop after 2 steps
        loader = make_loader(shards, rank=rank, world=2, workers=2)
        for b in take(loader, 2):
            seen.update(k for k, v in zip(b.keys, b.valid.tolist()) if v)
        states.append(loader.state_dict())
    assert states[0] == states[1]  # every rank holds the same data state
    for rank in range(3):  # resume on 3 ranks x 1 worker until the epoch ends
        loader = make_loader(shards, rank=rank, world=3, workers=1)
        loader.load_state_dict(states[0])
        for b in loader.batches():
            seen.update(k for k, v in zip(b.keys, b.valid.tolist()) if v)
            if loader.epoch != 0:
                break
    assert sorted(seen) == sorted(keys) and set(seen.values()) == {1}


def test_resume_refuses_a_state_from_other_shards(uneven_shards, tmp_path):
    shards, _ = uneven_shards
    state = make_loader(shards, rank=0, world=1, workers=0).state_dict()
    other, _ = write_uneven_shards(tmp_path, sizes=(5, 5))
    with pytest.raises(DataError, match="other sample-order settings.*shards"):
        make_loader(other, rank=0, world=1, workers=0).load_state_dict(state)


@pytest.mark.parametrize("change", [{"buffer": 2}, {"shuffle_shards": False}, {"seed": 4}])
def test_resume_refuses_changed_shuffle_settings_or_resets_on_request(uneven_shards, change):
    """Finding: shuffle_buffer 20 -> 5 on resume was accepted and broke exactly-once (20 of 88
    samples never seen, 18 twice). Every setting that orders samples is in the saved position."""
    shards, keys = uneven_shards
    stopped = make_loader(shards, rank=0, world=1, workers=0)
    head = take(stopped, 3)
    state = json.loads(json.dumps(stopped.state_dict()))
    changed = make_loader(shards, rank=0, world=1, workers=0, **change)
    with pytest.raises(DataError, match="other sample-order settings") as raised:
        changed.load_state_dict(state)
    assert "\n" not in str(raised.value) and "data.resume=reset" in str(raised.value)
    reset = make_loader(shards, rank=0, world=1, workers=0, **change)
    reset.load_state_dict(state, "reset")
    assert reset.epoch == 1 and reset.batches_done == 0
    seen = collections.Counter()
    for batch in reset.batches():  # a whole fresh epoch of the new order: every sample once
        seen.update(k for k, v in zip(batch.keys, batch.valid.tolist()) if v)
        if reset.epoch == 2:
            break
    assert sorted(seen) == sorted(keys) and set(seen.values()) == {1}
    assert head  # the first segment ran


def test_eval_loader_pads_with_invalid_samples(uneven_shards):
    shards, keys = uneven_shards
    data = DataConfig(eval_shards=shards, num_workers=0)
    seen, counts = [], []
    for rank in range(3):
        loader = build_eval_loader(data, micro_batch_size=MICRO, image_size=16, num_classes=12, rank=rank,
                                   world_size=3)
        batches = list(loader)
        counts.append(len(batches))
        seen += [k for b in loader.batches() for k, v in zip(b.keys, b.valid.tolist()) if v]
        assert all(v.dtype == torch.bool for _, _, v in batches)
    assert len(set(counts)) == 1 and sorted(seen) == sorted(keys)


def test_multi_label_targets_are_multi_hot(tmp_path):
    shards, _ = write_uneven_shards(tmp_path, sizes=(6, 6), multi_label=True)
    _, labels = digits_arrays(16)
    loader = make_loader(shards, rank=0, world=1, workers=0, multi_label=True)
    for batch in take(loader, 3):
        assert batch.targets.dtype == torch.float32 and batch.targets.shape == (MICRO, 12)
        for key, row in zip(batch.keys, batch.targets):
            digit = labels[int(key.split("_")[1])]
            assert torch.nonzero(row).flatten().tolist() == sorted([digit, 10 + digit % 2])


def test_resampled_mode_draws_shards_with_replacement(uneven_shards):
    shards, keys = uneven_shards
    loader = make_loader(shards, rank=0, world=2, workers=0, resampled=True)
    batches = take(loader, 3 * loader.steps_per_epoch)
    drawn = {k for b in batches for k in b.keys}
    assert drawn <= set(keys) and len(drawn) < len(keys) * 3


def test_mixup_cutmix_and_randaugment_are_off_by_default_and_work_when_on(uneven_shards):
    shards, _ = uneven_shards
    plain = take(make_loader(shards, rank=0, world=1, workers=0), 2)
    mixed = take(make_loader(shards, rank=0, world=1, workers=0, mixup_alpha=0.5, cutmix_alpha=1.0), 2)
    for batch in mixed:
        assert batch.targets.shape == (MICRO, 12)
        torch.testing.assert_close(batch.targets.sum(1), torch.ones(MICRO))
        assert (batch.targets.max(1).values < 1).any() or not torch.equal(batch.images, plain[0].images)
    randaug = take(make_loader(shards, rank=0, world=1, workers=0, randaugment_layers=2,
                               randaugment_magnitude=15), 2)
    assert [b.keys for b in randaug] == [b.keys for b in plain]
    assert not torch.equal(randaug[0].images, plain[0].images)


def test_pipe_urls_need_allow_shell(uneven_shards, tmp_path):
    shards, keys = uneven_shards
    piped = tmp_path / "piped.txt"
    from pathlib import Path
    base = Path(shards).parent
    piped.write_text("".join(f"pipe:cat {base / name}\n" for name in open(shards).read().split()))
    with pytest.raises(ConfigError, match="allow_shell"):
        make_loader(str(piped), rank=0, world=1, workers=0)
    import shutil
    shutil.copy(base / "_info.json", tmp_path / "_info.json")
    loader = make_loader(str(piped), rank=0, world=1, workers=0, allow_shell=True, index=str(tmp_path / "_info.json"))
    seen = [k for b in take(loader, loader.steps_per_epoch) for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert sorted(seen) == sorted(keys)


def test_too_few_shards_refused_when_asked(uneven_shards):
    shards, _ = uneven_shards
    with pytest.raises(ConfigError, match="5 shards"):
        make_loader(shards, rank=0, world=3, workers=2, few_shards="refuse")


def test_multi_label_class_names_through_a_class_map(tmp_path):
    from vitscale.data.writer import write_shards

    names = ["cat", "dog", "car"]
    (tmp_path / "classes.json").write_text(json.dumps(names))
    records = [{"__key__": f"s{i}", "png": r["png"], "json": json.dumps(["dog", "car"][: 1 + i % 2]).encode()}
               for i, r in enumerate(__import__("data_fixtures").digit_records(range(4)))]
    pattern, _ = write_shards(records, tmp_path, prefix="named", max_count=4)
    cfg = DataConfig(train_shards=pattern, num_workers=0, multi_label=True, class_map=str(tmp_path / "classes.json"))
    batch = next(build_train_loader(cfg, micro_batch_size=4, image_size=16, num_classes=3, rank=0, world_size=1,
                                    seed=0).batches())
    expected = {f"s{i}": [0.0, 1.0, float(i % 2)] for i in range(4)}
    assert {k: t.tolist() for k, t in zip(batch.keys, batch.targets)} == expected


def test_ranks_plan_over_rank_zeros_shard_list_and_refuse_to_differ(tmp_path):
    """Finding: without an index, a shard briefly missing on one node gave that rank 13 batches
    and the others 15, and 12 of 120 samples were lost silently. Rank 0 now lists and counts for
    every rank; a rank that cannot read a shard leaves counted holes, and plans that still differ
    (another seed, settings) stop the job before the first step."""
    from types import SimpleNamespace

    from vitscale.train import check_ranks_agree_on_data

    for shard in range(6):
        write_shards(digit_records(range(shard * 20, shard * 20 + 20)), tmp_path, prefix=f"p{shard}", max_count=20)
    (tmp_path / "_info.json").unlink()
    pattern = str(tmp_path)
    answers = []

    def rank0_share(value):  # what broadcast_object does: every rank gets rank 0's value
        if not answers:
            answers.append(value)
        return answers[0]

    first = make_loader(pattern, rank=0, world=2, workers=0, share=rank0_share)
    hidden = tmp_path / "p3-000000.tar"
    hidden.rename(tmp_path / "away")  # rank 1's node (here: both, from now on) does not see it
    second = make_loader(pattern, rank=1, world=2, workers=0, share=rank0_share)
    assert first.steps_per_epoch == second.steps_per_epoch
    seen, holes = collections.Counter(), 0
    for loader in (first, second):
        for batch in loader.batches():
            seen.update(k for k, v in zip(batch.keys, batch.valid.tolist()) if v)
            holes += int((~batch.valid).sum())
            if loader.epoch == 1:
                break
    assert set(seen.values()) == {1} and len(seen) + holes == 120  # no padding: 120 = 2 ranks x 15 x 4
    missing = sum(loader.skipped_samples().get("missing_shard", 0) for loader in (first, second))
    assert missing == 120 - len(seen) == 20

    comm = SimpleNamespace(all_gather_object=lambda value: [value, "another plan"])
    trainer = SimpleNamespace(loader=first, engine=SimpleNamespace(comm=comm))
    with pytest.raises(DataError, match=r"ranks \[1\] plan another data epoch"):
        check_ranks_agree_on_data(trainer)
    comm.all_gather_object = lambda value: [value, value]
    check_ranks_agree_on_data(trainer)
