"""TrainingMetrics: what each rank exports over HTTP, the file_sd targets rank 0 writes, stragglers.

The exposition is read back over a real socket and parsed with prometheus_client's own text parser,
so names, types, labels and values are checked as a scraper sees them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.daemons import free_port
from vitscale.config import load_config
from vitscale.errors import ConfigError
from vitscale.metrics import MetricsConfig, TrainingMetrics
from vitscale.metrics.stragglers import find_stragglers

REPO = Path(__file__).resolve().parents[1]


def scrape(port: int) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from a live /metrics endpoint."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels):
    matches = [v for lab, v in samples[name] if all(lab.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


@pytest.fixture
def metrics_factory(tmp_path):
    created = []

    def make(**overrides):
        cfg = MetricsConfig(port=overrides.pop("port", free_port(2)),
                            file_sd_dir=overrides.pop("file_sd_dir", str(tmp_path / "targets")), **overrides)
        metrics = TrainingMetrics(cfg, rank=0, local_rank=0, world_size=1, job_id="4242",
                                  model_name="H/14", run_dir=tmp_path / "run_a")
        created.append(metrics)
        return metrics

    yield make
    for metrics in created:
        metrics.close()


def test_step_metrics_follow_prometheus_conventions_and_values(metrics_factory):
    metrics = metrics_factory()
    metrics.record_step(7, loss=2.5, lr=3e-4, grad_norm=1.25, images=32, tokens=32 * 257,
                        step_seconds=0.5, data_wait_seconds=0.02, mfu=0.41)
    metrics.record_step(8, loss=2.0, lr=2e-4, grad_norm=0.75, images=32, tokens=32 * 257,
                        step_seconds=0.25, data_wait_seconds=0.3, mfu=None)
    samples = scrape(metrics.port)
    run = {"job_id": "4242", "rank": "0", "model": "H/14"}
    assert value(samples, "vitscale_train_steps_total", **run) == 2  # steps this process trained
    assert value(samples, "vitscale_train_step", **run) == 8         # where the run is
    assert value(samples, "vitscale_train_samples_total", **run) == 64
    assert value(samples, "vitscale_train_tokens_total", **run) == 64 * 257
    assert value(samples, "vitscale_train_loss", **run) == 2.0
    assert value(samples, "vitscale_train_learning_rate", **run) == pytest.approx(2e-4)
    assert value(samples, "vitscale_train_grad_norm", **run) == 0.75
    assert value(samples, "vitscale_train_images_per_second", **run) == pytest.approx(32 / 0.25)
    assert value(samples, "vitscale_train_tokens_per_second", **run) == pytest.approx(32 * 257 / 0.25)
    assert value(samples, "vitscale_train_mfu_ratio", **run) == pytest.approx(0.41)  # None keeps the last
    # Histograms: cumulative buckets, count and sum as a scraper reads them.
    assert value(samples, "vitscale_train_step_duration_seconds_count", **run) == 2
    assert value(samples, "vitscale_train_step_duration_seconds_sum", **run) == pytest.approx(0.75)
    assert value(samples, "vitscale_train_step_duration_seconds_bucket", le="0.25", **run) == 1
    assert value(samples, "vitscale_train_step_duration_seconds_bucket", le="0.5", **run) == 2
    assert value(samples, "vitscale_train_data_wait_seconds_bucket", le="0.025", **run) == 1
    assert value(samples, "vitscale_train_data_wait_seconds_sum", **run) == pytest.approx(0.32)
    info = value(samples, "vitscale_run_info", **run)
    assert info == 1
    # Every vitscale series names its job, rank and model.
    for name, entries in samples.items():
        if name.startswith("vitscale_"):
            for labels, _ in entries:
                assert {"job_id", "rank", "model"} <= set(labels), name
    assert not any(name.endswith("_created") for name in samples)


def test_after_a_resume_the_counter_counts_trained_steps_and_the_gauge_the_position(metrics_factory):
    """A job resumed at step 1000 that trains steps 1001 and 1002: increase() over the job must
    be 2 (a counter set to the current step would jump by 1,002 and make rate() nonsense)."""
    metrics = metrics_factory(port=0)
    metrics.record_step(1001, 1.0, 1e-4, 1.0, 8, 8, 0.1, 0.0, None)
    metrics.record_step(1002, None, 1e-4, None, 8, 8, 0.1, 0.0, None)
    text = metrics.exposition()
    assert 'vitscale_train_steps_total{job_id="4242",model="H/14",rank="0"} 2.0' in text
    assert 'vitscale_train_step{job_id="4242",model="H/14",rank="0"} 1002.0' in text
    assert 'vitscale_train_loss{job_id="4242",model="H/14",rank="0"} 1.0' in text  # None keeps the last


def test_skipped_nan_checkpoint_eval_and_memory(metrics_factory):
    metrics = metrics_factory()
    metrics.record_skipped_samples({"corrupt_image": 2, "bad_label": 1})
    metrics.record_skipped_samples({"corrupt_image": 5, "bad_label": 1})  # cumulative from the loader
    metrics.record_nan_skip()
    metrics.record_nan_skip()
    before = time.time()
    metrics.record_checkpoint(12.5, ok=True, written_bytes=4096)  # synchronous: blocked throughout
    metrics.record_checkpoint(20.0, ok=True, written_bytes=1024, blocked_seconds=0.5, background_seconds=19.25)
    metrics.record_checkpoint(3.0, ok=False)
    metrics.record_rejected_checkpoints(2)
    metrics.record_eval({"top1": 0.625, "top5": 0.9})
    metrics.record_step(1, 1.0, 1e-4, 1.0, 8, 8, 0.1, 0.0, None)
    samples = scrape(metrics.port)
    assert value(samples, "vitscale_data_skipped_samples_total", reason="corrupt_image") == 5
    assert value(samples, "vitscale_data_skipped_samples_total", reason="bad_label") == 1
    assert value(samples, "vitscale_train_nan_skipped_steps_total") == 2
    assert value(samples, "vitscale_checkpoint_save_duration_seconds_sum") == 32.5
    assert value(samples, "vitscale_checkpoint_save_duration_seconds_count") == 2
    assert value(samples, "vitscale_checkpoint_blocked_seconds_sum") == 13.0
    assert value(samples, "vitscale_checkpoint_background_seconds_sum") == 19.25
    assert value(samples, "vitscale_checkpoint_save_failures_total") == 1
    assert value(samples, "vitscale_checkpoint_written_bytes_total") == 5120
    assert value(samples, "vitscale_checkpoint_verification_failures_total") == 2
    assert before <= value(samples, "vitscale_checkpoint_last_success_timestamp_seconds") <= time.time()
    assert value(samples, "vitscale_eval_result", metric="top1") == 0.625
    # CPU run: resident memory, checked against the kernel's own accounting (same order).
    resident = value(samples, "vitscale_device_memory_bytes", kind="resident")
    with open(f"/proc/{os.getpid()}/status") as status:
        vm_rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
    assert 0.5 * vm_rss < resident < 2 * vm_rss


def test_server_binds_loopback_by_default_and_close_stops_it(metrics_factory):
    metrics = metrics_factory()
    assert metrics._server.socket.getsockname()[0] == "127.0.0.1"
    port = metrics.port
    metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_busy_port_warns_and_training_goes_on(metrics_factory, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with caplog.at_level(logging.WARNING, logger="vitscale.metrics"):
            metrics = metrics_factory(port=taken.getsockname()[1])
    assert metrics.port is None
    assert "metrics.port" in caplog.text
    metrics.record_step(1, 1.0, 1e-4, 1.0, 8, 8, 0.1, 0.0, None)  # still records


def test_file_sd_target_file_written_atomically_and_removed_at_close(metrics_factory, tmp_path):
    metrics = metrics_factory()
    files = list((tmp_path / "targets").iterdir())
    assert files == [metrics.target_file] and files[0].name == "vitscale_4242_run_a.json"
    groups = json.loads(files[0].read_text())
    assert groups == [{"targets": [f"127.0.0.1:{metrics.port}"],
                       "labels": {"vitscale_run": "run_a", "vitscale_world_size": "1"}}]
    metrics.close()
    assert list((tmp_path / "targets").iterdir()) == []


def test_unwritable_target_directory_warns_and_training_goes_on(metrics_factory, tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the targets directory should be")
    with caplog.at_level(logging.WARNING, logger="vitscale.metrics"):
        metrics = metrics_factory(file_sd_dir=str(blocker))
    assert metrics.target_file is None and "metrics.file_sd_dir" in caplog.text
    assert scrape(metrics.port)["vitscale_run_info"]  # the endpoint still serves


def test_job_id_cannot_escape_the_target_directory(tmp_path):
    cfg = MetricsConfig(port=free_port(2), file_sd_dir=str(tmp_path / "targets"))
    with TrainingMetrics(cfg, rank=0, local_rank=0, world_size=1, job_id="../../x;$(id)",
                         model_name="B/16", run_dir=tmp_path / "r") as metrics:
        assert metrics.target_file.parent == tmp_path / "targets"
        assert "/" not in metrics.target_file.name and "$" not in metrics.target_file.name


def test_straggler_warning_names_the_slow_rank_and_its_cause(metrics_factory, caplog):
    metrics = metrics_factory(straggler_factor=1.5)
    with caplog.at_level(logging.WARNING, logger="vitscale.metrics"):
        metrics.record_rank_times([0.95, 1.05, 0.85, 0.95], [0.05, 0.05, 0.05, 0.05])
        assert caplog.text == ""  # all within 1.5x of the median
        metrics.record_rank_times([0.95, 0.95, 0.95, 1.1], [0.05, 0.05, 0.05, 0.9])
    assert "rank 3" in caplog.text and "2.00x" in caplog.text and "input-bound" in caplog.text
    samples = scrape(metrics.port)
    assert value(samples, "vitscale_straggler_compute_seconds", peer_rank="3") == 1.1
    assert value(samples, "vitscale_straggler_data_wait_seconds", peer_rank="3") == 0.9
    assert value(samples, "vitscale_straggler_max_ratio") == pytest.approx(2.0)
    assert value(samples, "vitscale_straggler_warnings_total") == 1
    (slow,) = metrics.record_rank_times([0.2, 0.9], [0.01, 0.01])  # compute-bound, 2 ranks
    assert slow.rank == 1 and not slow.input_bound and "compute-bound" in slow.message()


def test_find_stragglers_uses_the_median_not_the_mean():
    # Two slow ranks of five: the mean would hide them, the median does not.
    slow = find_stragglers([1, 1, 1, 3, 3], [0, 0, 0, 0.1, 0.1], factor=1.5)
    assert [s.rank for s in slow] == [3, 4] and not slow[0].input_bound
    assert find_stragglers([5.0], [0.0], factor=1.5) == []


def test_metrics_config_is_validated_with_the_key_and_fix():
    with pytest.raises(ConfigError, match="metrics.port"):
        load_config(None, ["metrics.port=70000"])
    with pytest.raises(ConfigError, match=r"metrics.straggler_factor.*> 1"):
        load_config(None, ["metrics.straggler_factor=0.5"])
    cfg = load_config(None, ["metrics.file_sd_dir=/srv/prom/targets", "metrics.address=0.0.0.0"])
    assert cfg.metrics.file_sd_dir == "/srv/prom/targets" and cfg.metrics.address == "0.0.0.0"


TWO_RANKS = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    import torch
    from vitscale.engine.distributed import Communicator
    from vitscale.metrics import MetricsConfig, TrainingMetrics
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    cfg = MetricsConfig(port=int(sys.argv[3]), file_sd_dir=sys.argv[4])
    metrics = TrainingMetrics(cfg, rank=rank, local_rank=rank, world_size=2, job_id="77",
                              model_name="Ti/16", run_dir="runs/two",
                              gather_objects=Communicator(torch.device("cpu"), 2, distributed=True).all_gather_object)
    metrics.record_step(1, 3.0 + rank, 1e-3, 1.0, 8, 8 * 65, 0.5, 0.01, None)
    dist.barrier()
    if rank == 0:
        print(open(metrics.target_file).read(), flush=True)
    dist.barrier()
    metrics.close()
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_rank0_lists_every_rank_gathered_over_torch_distributed(tmp_path):
    base, rendezvous = free_port(2), free_port(2)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    targets = tmp_path / "targets"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(rendezvous), str(base), str(targets)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode == 0 for proc in procs), outputs
    groups = json.loads(outputs[0][0])
    assert groups[0]["targets"] == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    assert list(targets.iterdir()) == []  # rank 0 removed its file at close
