"""Checkpoints: atomic files and markers, retention, safe loading, and exact resume after kill -9,
a kill during a checkpoint write and a full disk (2 CPU ranks, gloo, ZeRO-2)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_engine_support import engine_digits, module_state, read_log, run_job, step_losses, tiny_args  # noqa: F401
from vitscale.engine import checkpoint as ckpt
from vitscale.engine.faults import EXIT_CHECKPOINT_FAILED
from vitscale.errors import CheckpointError


# ---------------------------------------------------------------------------------------------
# Units: markers, retention, atomic writes, safe loading, RNG state.


def make_checkpoint(run_dir, step, complete=True):
    path = ckpt.checkpoint_dir(run_dir, step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.mark_complete(path, {"step": step})
    return path


def test_latest_complete_ignores_unfinished_checkpoints(tmp_path):
    assert ckpt.latest_complete(tmp_path) is None
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 200)
    make_checkpoint(tmp_path, 300, complete=False)  # killed mid-write
    assert ckpt.latest_complete(tmp_path) == ckpt.checkpoint_dir(tmp_path, 200)
    assert ckpt.resolve_checkpoint(tmp_path) == ckpt.checkpoint_dir(tmp_path, 200)
    with pytest.raises(CheckpointError, match="interrupted"):
        ckpt.resolve_checkpoint(ckpt.checkpoint_dir(tmp_path, 300))


def test_retention_keeps_newest_complete_and_drops_stale_partials(tmp_path):
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 5, complete=False)       # newer than every complete one: kept (may be in flight)
    partial_old = make_checkpoint(tmp_path, 0, complete=False)
    deleted = ckpt.apply_retention(tmp_path, keep_last=2)
    left = [(step, done) for step, _, done in ckpt.list_checkpoints(tmp_path)]
    assert left == [(3, True), (4, True), (5, False)]
    assert partial_old in deleted
    # keep_last can never remove the newest complete checkpoint.
    ckpt.apply_retention(tmp_path, keep_last=0)
    assert ckpt.latest_complete(tmp_path) == ckpt.checkpoint_dir(tmp_path, 4)


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "state.pt"

    def fill_disk(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        ckpt.write_atomic(target, fill_disk)
    assert list(tmp_path.iterdir()) == []


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_loading_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"module": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.safe_torch_load(path)
    path.write_bytes(pickle.dumps({"x": 1})[:5])
    with pytest.raises(CheckpointError):
        ckpt.safe_torch_load(path)


def test_manifest_finds_every_kind_of_damage_and_shares_cover_each_file_once(tmp_path):
    from vitscale.engine import manifest

    rng = np.random.default_rng(0)
    files = []
    for rank, size in ((0, 300_000), (0, 5), (1, 1 << 20), (1, 70_000)):
        path = tmp_path / ("dcp" if size == 5 else ".") / f"part_{rank}_{size}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(rng.bytes(size))
        files.append((rank, path))
    for rank in (0, 1):
        manifest.write_manifest(tmp_path, rank, [path for owner, path in files if owner == rank])
    assert manifest.verify(tmp_path, 2) == []
    import xxhash  # the manifest holds an independent digest of the same bytes

    entry = json.loads(manifest.manifest_path(tmp_path, 0).read_text())["files"][files[0][1].name]
    assert entry == {"bytes": 300_000, "xxh3_128": xxhash.xxh3_128(files[0][1].read_bytes()).hexdigest()}
    expected = manifest.read_manifests(tmp_path, 2).files
    assert sorted(expected) == sorted(path.relative_to(tmp_path).as_posix() for _, path in files)
    for count in (1, 2, 3, 7):
        shares = manifest.assign_shares(expected, count)
        assert sorted(name for share in shares for name in share) == sorted(expected)
        assert all(manifest.verify(tmp_path, 2, share=(index, count)) == [] for index in range(count))
    # A flipped bit is found by exactly the share that digests the file; size and presence by share 0.
    big = files[2][1]
    damage_file(big, "flipped byte")
    found = [manifest.verify(tmp_path, 2, share=(index, 3)) for index in range(3)]
    assert sum(len(problems) for problems in found) == 1, found
    assert f"checkpoint file {big} (written by rank 1) does not match its checksum" in sum(found, [])[0]
    damage_file(files[0][1], "cut short")
    damage_file(files[1][1], "missing")
    manifest.manifest_path(tmp_path, 1).write_text("{not json")
    problems = manifest.verify(tmp_path, 2)
    assert any("manifest_rank_00001.json is unreadable" in p for p in problems), problems
    assert any(f"{files[0][1]} (written by rank 0) has 150000 bytes, its manifest says 300000" in p for p in problems)
    assert any(f"{files[1][1]} (written by rank 0) is missing" in p for p in problems)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.torch_save_atomic({"rng": ckpt.rng_state()}, tmp_path / "rank.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.safe_torch_load(tmp_path / "rank.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------------------------------------
# 2 ranks: exact resume, kill during a write, full disk.

T = 4


def test_kill_9_and_resume_is_bitwise_identical(tmp_path, engine_digits):
    straight = tmp_path / "straight"
    # The straight run also evaluates on the held-out shards (at step T and at the end).
    job = run_job(tiny_args(straight, engine_digits, f"run.steps={2 * T}", f"engine.checkpoint_every={T}",
                            f"engine.eval_every={T}", eval_shards=True), tmp_path / "logs_straight")
    evals = [r for r in read_log(straight) if "eval" in r]
    assert [r["step"] for r in evals] == [T, 2 * T]
    # Every one of the 360 held-out digits counted exactly once over both ranks (padding excluded).
    assert all(r["eval"]["samples"] == 360 and 0 <= r["eval"]["top1"] <= 1 for r in evals), evals
    progress = [line for line in job.output(0).splitlines() if line.startswith(f"step {2 * T}/{2 * T} |")]
    assert progress and "images/s" in progress[0] and "ETA" in progress[0], job.output(0)
    record = [r for r in read_log(straight) if r.get("step") == 2 * T and "loss" in r][0]
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "images_per_second", "tokens_per_second", "mfu",
                           "elapsed_seconds"}

    resumed = tmp_path / "resumed"
    args = tiny_args(resumed, engine_digits, f"run.steps={2 * T}", f"engine.checkpoint_every={T}")
    # Every process SIGKILLs itself as step T+1 starts: what `kill -9` of the whole job leaves.
    killed = run_job(args, tmp_path / "logs_killed", expect=None,
                     env={"VITSCALE_INJECT_FAULT": f"kill@point=step_start,step={T + 1}"})
    assert killed.codes == [-9, -9], killed.output()
    assert ckpt.latest_complete(resumed) == ckpt.checkpoint_dir(resumed, T)
    job = run_job(args, tmp_path / "logs_resume")
    assert f"resumed from {ckpt.checkpoint_dir(resumed, T)} at step {T}" in job.output(0)

    straight_losses, resumed_losses = step_losses(straight), step_losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 2 * T + 1))
    assert resumed_losses == straight_losses  # bitwise: the same floats in the log
    final_a = module_state(ckpt.checkpoint_dir(straight, 2 * T))
    final_b = module_state(ckpt.checkpoint_dir(resumed, 2 * T))
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    for rank in (0, 1):  # Adam moments of each ZeRO partition, too
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        opt_a = ckpt.safe_torch_load(ckpt.checkpoint_dir(straight, 2 * T) / name)["optimizer_state_dict"]
        opt_b = ckpt.safe_torch_load(ckpt.checkpoint_dir(resumed, 2 * T) / name)["optimizer_state_dict"]
        for state_a, state_b in zip(opt_a["base_optimizer_state"]["state"].values(),
                                    opt_b["base_optimizer_state"]["state"].values()):
            assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
            assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])


def test_full_disk_and_kill_during_write_leave_previous_checkpoint_loadable(tmp_path, engine_digits):
    """Step 4's save hits a full disk on rank 1 only (rank 0's files are written): reported, not
    marked complete, training goes on. Step 6's save is cut by kill -9 of rank 1 mid-write.
    The resume must pick step 2, the last checkpoint every rank finished."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=8", "engine.checkpoint_every=2",
                     "engine.collective_timeout_seconds=20")
    faults = "disk_full@point=checkpoint_write,step=4,rank=1;kill@point=checkpoint_write,step=6,rank=1"
    job = run_job(args, tmp_path / "logs_faults", expect=None, timeout=150, env={"VITSCALE_INJECT_FAULT": faults},
                  stop_on_first_failure=True)
    assert job.codes[1] == -9, job.output()
    assert "No space left on device" in job.stderr(1)
    assert "step 4: checkpoint FAILED" in job.output(0)
    assert [(r["step"], r["checkpoint_ok"]) for r in read_log(run_dir) if "checkpoint_ok" in r] == \
        [(2, True), (4, False)]
    assert not ckpt.checkpoint_dir(run_dir, 4).exists()  # the failed save's files were removed
    interrupted = ckpt.checkpoint_dir(run_dir, 6)
    assert interrupted.is_dir() and not ckpt.is_complete(interrupted)
    assert ckpt.latest_complete(run_dir) == ckpt.checkpoint_dir(run_dir, 2)

    job = run_job(args, tmp_path / "logs_resume")
    assert f"resumed from {ckpt.checkpoint_dir(run_dir, 2)} at step 2" in job.output(0)
    assert ckpt.is_complete(interrupted)  # saved whole this time
    assert ckpt.latest_complete(run_dir) == ckpt.checkpoint_dir(run_dir, 8)
    trainer = json.loads((ckpt.checkpoint_dir(run_dir, 8) / "trainer.json").read_text())
    assert trainer["step"] == 8 and trainer["world_size"] == 2


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 384 KB filesystem: a config and a log fit, no checkpoint of the tiny job does."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("kind", ["deepspeed", "fsdp2"])
def test_a_real_full_disk_fails_each_save_cleanly_on_every_rank(tmp_path, engine_digits, small_tmpfs, kind):
    """Finding: a full tmpfs crashed every rank at the save (torch.save raises RuntimeError on
    ENOSPC; only OSError was caught, and the injected fault raised OSError)."""
    run_dir = small_tmpfs / "run"
    args = tiny_args(run_dir, engine_digits, "run.steps=4", "engine.checkpoint_every=2", f"engine.kind={kind}")
    job = run_job(args, tmp_path / "logs", expect=None, timeout=200)
    assert job.codes == [EXIT_CHECKPOINT_FAILED] * 2, job.output()
    assert "step 2: checkpoint FAILED" in job.output(0) and "step 4: checkpoint FAILED" in job.output(0)
    for rank in (0, 1):
        assert "Traceback" not in job.stderr(rank), job.stderr(rank)
    # ENOSPC reads "No space left on device" from Python's writers, "basic_ios::clear: iostream error" from
    # torch.save's C++ stream (which one a rank hits first depends on timing)
    errors = job.stderr(0) + job.stderr(1)
    assert "No space left on device" in errors or "iostream error" in errors, errors
    assert [r["checkpoint_ok"] for r in read_log(run_dir) if "checkpoint_ok" in r] == [False, False]
    assert ckpt.latest_complete(run_dir) is None
    assert not ckpt.checkpoint_dir(run_dir, 2).exists()  # the failed save's files were removed


def damage_file(path, damage):
    """One flipped byte in the middle, the second half cut off, or the file gone."""
    if damage == "flipped byte":
        with open(path, "r+b") as handle:
            handle.seek(path.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x10]))
    elif damage == "cut short":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()


@pytest.mark.parametrize("kind,damage", [("deepspeed", "flipped byte"), ("fsdp2", "missing")])
def test_auto_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, engine_digits, kind, damage):
    """A damaged file of rank 1 in the newest checkpoint: every rank learns of it before any
    state is read, auto-resume names file, rank and problem, and resumes from the previous
    checkpoint; the loss curve continues from there exactly as the first run's did."""
    run_dir = tmp_path / "run"
    run_job(tiny_args(run_dir, engine_digits, "run.steps=4", "engine.checkpoint_every=2", f"engine.kind={kind}"),
            tmp_path / "logs_first")
    first = step_losses(run_dir)
    newest = ckpt.checkpoint_dir(run_dir, 4)
    part = next(newest.glob("*zero_pp_rank_1_*optim_states.pt")) if kind == "deepspeed" else \
        next((newest / "dcp").glob("__1_*.distcp"))
    damage_file(part, damage)
    job = run_job(tiny_args(run_dir, engine_digits, "run.steps=4", "engine.checkpoint_every=2", f"engine.kind={kind}"),
                  tmp_path / "logs_resume", timeout=180)
    said = {"flipped byte": "does not match its checksum", "cut short": "has ", "missing": "is missing"}[damage]
    lines = [line for line in job.stderr(0).splitlines() if "fails verification" in line]
    assert len(lines) == 1 and f"checkpoint file {part} (written by rank 1) {said}" in lines[0], job.stderr(0)
    assert "trying the previous one" in lines[0]
    assert f"resumed from {ckpt.checkpoint_dir(run_dir, 2)} at step 2" in job.output(0)
    (record,) = [r for r in read_log(run_dir) if "resumed_from" in r]
    assert record["rejected_checkpoints"] == [lines[0].split("checkpoint ", 1)[1].split("; trying")[0]]
    resumed = [r for r in read_log(run_dir) if "loss" in r]
    assert [r["step"] for r in resumed][-2:] == [3, 4]
    assert [r["loss"] for r in resumed][-2:] == [first[3], first[4]]  # bitwise: the same floats
    assert ckpt.latest_complete(run_dir) == newest and not manifest_problems(newest)  # saved whole again
    (kept,) = ckpt.checkpoints_root(run_dir).glob("step_00000004.damaged-*")  # the damaged one, for inspection
    assert (kept / part.relative_to(newest)).exists() != (damage == "missing")


def manifest_problems(path):
    from vitscale.engine import manifest

    return manifest.verify(path, ckpt.read_complete(path)["manifests"])


def test_resume_from_a_named_damaged_checkpoint_stops_every_rank_naming_file_and_rank(tmp_path, engine_digits):
    """Finding: a truncated or missing file of rank 1 made rank 1 exit 2 silently and rank 0 print
    "resumed..." and then a false "a collective timed out after 120 s". engine.resume=PATH to a
    damaged checkpoint is an error on every rank, never a fall-back."""
    run_dir = tmp_path / "run"
    run_job(tiny_args(run_dir, engine_digits, "run.steps=2"), tmp_path / "logs_first")
    saved = ckpt.checkpoint_dir(run_dir, 2)
    (part,) = saved.glob("*zero_pp_rank_1_*optim_states.pt")
    os.truncate(part, part.stat().st_size // 2)
    job = run_job(tiny_args(tmp_path / "other", engine_digits, "run.steps=4", f"engine.resume={saved}"),
                  tmp_path / "logs_resume", expect=None, timeout=120)
    assert job.codes == [2, 2], job.output()
    for rank in (0, 1):
        lines = [line for line in job.stderr(rank).splitlines() if "error:" in line]
        assert len(lines) == 1, job.stderr(rank)
        assert f"rank {rank}: error: {saved} fails verification: checkpoint file {part} (written by rank 1) has " \
            in lines[0], lines[0]
        assert "timed out" not in job.output(rank) and "resumed from" not in job.output(rank)
    # The command-line check says the same, and which checkpoint auto-resume would take (none).
    checked = subprocess.run([sys.executable, "-m", "vitscale", "checkpoint", "verify", str(run_dir)],
                             capture_output=True, text=True)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert f"{saved}: FAILED (1 problem)" in checked.stdout and str(part) in checked.stdout
    assert "engine.resume=auto takes: none" in checked.stdout


def manifest_digests(path):
    """{file: xxh3-128} over every rank's manifest, leaving out the files that differ between two
    runs by design, compared apart: trainer.json (elapsed seconds), config.yaml (the
    checkpoint_async setting itself), DCP's .metadata (a fresh save id per save) and the rank
    files (Python's and NumPy's global RNGs are seeded by the OS in each process)."""
    digests = {}
    for rank_manifest in sorted(path.glob("manifest_rank_*.json")):
        for name, entry in json.loads(rank_manifest.read_text())["files"].items():
            if name not in ("trainer.json", "config.yaml", "dcp/.metadata") and not name.startswith("rank_"):
                digests[name] = entry["xxh3_128"]
    return digests


def rank_positions(path):
    """Each rank's data-loader position and torch RNG state."""
    states = [ckpt.safe_torch_load(file) for file in sorted(path.glob("rank_*.pt"))]
    return [(state["loader"], state["rng"]["torch"].tolist(), state["step"]) for state in states]


def dcp_index(path):
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path / "dcp")).read_metadata()
    return metadata.state_dict_metadata, {key: (item.relative_path, item.offset, item.length)
                                          for key, item in metadata.storage_data.items()}


@pytest.mark.parametrize("kind", ["deepspeed", "fsdp2"])
def test_background_saves_equal_synchronous_ones_and_a_kill_mid_write_resumes_from_the_previous(
        tmp_path, engine_digits, kind):
    """engine.checkpoint_async=true: periodic saves are staged to host memory and written while
    training goes on. Rank 1 sleeps, then is killed -9, inside its background write of step 4
    (training has gone on to step 6 meanwhile): step 4 never gets COMPLETE, the rerun resumes
    from step 2, and every loss and every file of the background saves equals those of a
    synchronous, uninterrupted run, though training went on while they were written."""
    common = ("run.steps=6", "engine.checkpoint_every=2", "engine.keep_last=3", f"engine.kind={kind}",
              "engine.collective_timeout_seconds=20")
    sync_dir, run_dir = tmp_path / "sync", tmp_path / "async"
    run_job(tiny_args(sync_dir, engine_digits, *common, "engine.checkpoint_async=false"), tmp_path / "logs_sync")
    args = tiny_args(run_dir, engine_digits, *common, "engine.checkpoint_async=true")
    faults = "sleep@point=checkpoint_write,step=4,rank=1,seconds=4;kill@point=checkpoint_write,step=4,rank=1"
    killed = run_job(args, tmp_path / "logs_killed", expect=None, timeout=150, env={"VITSCALE_INJECT_FAULT": faults},
                     stop_on_first_failure=True)
    assert killed.codes[1] == -9, killed.output()
    assert sorted(step_losses(run_dir)) == [1, 2, 3, 4, 5, 6], killed.output()  # trained on while step 4 was written
    assert "step 6: the checkpoint of step 4 is still being written; waiting for it" in killed.output(0)
    assert not ckpt.is_complete(ckpt.checkpoint_dir(run_dir, 4))
    assert ckpt.latest_complete(run_dir) == ckpt.checkpoint_dir(run_dir, 2)
    (saved,) = [r for r in read_log(run_dir) if r.get("checkpoint_ok")]
    assert saved["step"] == 2 and saved["checkpoint_background_seconds"] > 0

    # Every rank's write of step 4 now outlasts steps 5 and 6, whose updates must not reach its files:
    slow_writes = {"VITSCALE_INJECT_FAULT": "sleep@point=checkpoint_write,step=4,seconds=3"}
    job = run_job(args, tmp_path / "logs_resume", env=slow_writes)
    assert f"resumed from {ckpt.checkpoint_dir(run_dir, 2)} at step 2" in job.output(0)
    assert "step 6: the checkpoint of step 4 is still being written; waiting for it" in job.output(0)
    resumed = [r for r in read_log(run_dir) if "loss" in r][-4:]
    sync_losses = step_losses(sync_dir)
    assert [(r["step"], r["loss"]) for r in resumed] == [(s, sync_losses[s]) for s in (3, 4, 5, 6)]  # bitwise
    for step in (2, 4, 6):  # 2 and 4 written in the background, 6 (the end of the run) synchronously
        background, synchronous = ckpt.checkpoint_dir(run_dir, step), ckpt.checkpoint_dir(sync_dir, step)
        assert ckpt.is_complete(background) and not manifest_problems(background)
        digests = manifest_digests(background)
        assert len(digests) >= 2 and digests == manifest_digests(synchronous), step
        assert rank_positions(background) == rank_positions(synchronous)
        if kind == "fsdp2":
            assert dcp_index(background) == dcp_index(synchronous)
