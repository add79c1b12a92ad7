"""Per-rank Prometheus metrics of a training run.

Every rank serves /metrics on `metrics.port + local_rank` (bound to `metrics.address`); rank 0
also writes a file_sd target file listing all ranks, so a Prometheus that watches
`metrics.file_sd_dir` scrapes the job without a config edit. Names follow Prometheus
conventions (`vitscale_` prefix, base units in the name, `_total` counters). Every series carries
the labels job_id, rank and model.

    metrics = TrainingMetrics(cfg.metrics, rank=0, local_rank=0, world_size=2, job_id="123",
                              model_name="H/14", run_dir=run_dir)
    metrics.record_step(step, loss, lr, grad_norm, images, tokens, step_seconds, data_wait, mfu)
    metrics.close()

Construct it on every rank after torch.distributed is initialised: rank 0 gathers the ranks'
/metrics addresses with one all_gather_object.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector,
                               disable_created_metrics)
from prometheus_client.exposition import generate_latest, start_http_server

from vitscale.metrics import file_sd
from vitscale.metrics.config import MetricsConfig
from vitscale.metrics.stragglers import find_stragglers, own_times

log = logging.getLogger("vitscale.metrics")
disable_created_metrics()  # `_created` series double the count and no dashboard uses them

RUN_LABELS = ("job_id", "rank", "model")
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DATA_WAIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_SECONDS_BUCKETS = (0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class TrainingMetrics:
    """Prometheus metrics for one rank; every method is safe to call on every rank."""

    def __init__(self, metrics_cfg: MetricsConfig, *, rank: int, local_rank: int, world_size: int,
                 job_id: str, model_name: str, run_dir: str | Path, gather_objects=None):
        # gather_objects(value) -> every rank's value (the engine's comm.all_gather_object);
        # None: no process group, so rank 0 can list only its own node's ranks.
        self._gather_objects = gather_objects
        self.config = metrics_cfg
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.job_id, self.model_name, self.run_dir = str(job_id or ""), model_name, Path(run_dir)
        self.registry = CollectorRegistry()
        self._labels = {"job_id": self.job_id, "rank": str(rank), "model": model_name}
        self._define_metrics()
        # Construct after the engine placed the model: CUDA is initialised by then on GPU runs.
        self._cuda = _initialised_cuda()
        if self._cuda is None:  # CPU run: /proc is read when scraped, not on every step
            self._with(self.device_memory, kind="resident").set_function(_resident_bytes)
        self._skipped_totals: dict[str, int] = {}
        self._server = None
        self._closed = False
        self.target_file: Path | None = None
        self.port = self._start_server()
        self._publish_targets()
        atexit.register(self.close)

    # -----------------------------------------------------------------------------------------
    # Metric definitions.

    def _define_metrics(self) -> None:
        def gauge(name, doc, extra=()):
            return Gauge(name, doc, RUN_LABELS + tuple(extra), registry=self.registry)

        def counter(name, doc, extra=()):
            return Counter(name, doc, RUN_LABELS + tuple(extra), registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, RUN_LABELS, buckets=buckets, registry=self.registry)

        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, fds
        self.run_info = Info("vitscale_run", "Run identity", RUN_LABELS, registry=self.registry)
        # A true counter (steps this process trained: rate()/increase() stay right across resumes)
        # and the run's position as a gauge.
        self.steps = counter("vitscale_train_steps", "Optimizer steps trained by this process")
        self.current_step = gauge("vitscale_train_step", "The run's current optimizer step (resumes continue it)")
        self.samples = counter("vitscale_train_samples", "Training samples (images) processed by this rank")
        self.tokens = counter("vitscale_train_tokens", "Tokens (patches + extra tokens) processed by this rank")
        self.loss = gauge("vitscale_train_loss", "Training loss of the last step")
        self.learning_rate = gauge("vitscale_train_learning_rate", "Learning rate of the last step")
        self.grad_norm = gauge("vitscale_train_grad_norm", "Global gradient norm before clipping")
        self.images_per_second = gauge("vitscale_train_images_per_second", "Images per second on this rank")
        self.tokens_per_second = gauge("vitscale_train_tokens_per_second", "Tokens per second on this rank")
        self.mfu = gauge("vitscale_train_mfu_ratio", "Model FLOPs utilisation of this rank (0..1)")
        self.step_seconds = histogram("vitscale_train_step_duration_seconds",
                                      "Wall time of one optimizer step, data wait included",
                                      STEP_SECONDS_BUCKETS)
        self.data_wait_seconds = histogram("vitscale_train_data_wait_seconds",
                                           "Time per step spent waiting for the input pipeline",
                                           DATA_WAIT_SECONDS_BUCKETS)
        self.skipped_samples = counter("vitscale_data_skipped_samples",
                                       "Samples skipped by the input pipeline, by reason", ("reason",))
        self.nan_skipped_steps = counter("vitscale_train_nan_skipped_steps",
                                         "Steps skipped because the loss or gradients were not finite")
        self.checkpoint_seconds = histogram("vitscale_checkpoint_save_duration_seconds",
                                            "Wall time of successful checkpoint saves, start to COMPLETE",
                                            CHECKPOINT_SECONDS_BUCKETS)
        self.checkpoint_blocked_seconds = histogram("vitscale_checkpoint_blocked_seconds",
                                                    "Time training stood still for a successful save (all of "
                                                    "it when synchronous; staging and the final agreement "
                                                    "when asynchronous)", CHECKPOINT_SECONDS_BUCKETS)
        self.checkpoint_background_seconds = histogram("vitscale_checkpoint_background_seconds",
                                                       "Time a successful asynchronous save was written while "
                                                       "training went on (0 for synchronous saves)",
                                                       CHECKPOINT_SECONDS_BUCKETS)
        self.checkpoint_failures = counter("vitscale_checkpoint_save_failures", "Failed checkpoint saves")
        self.checkpoint_bytes = counter("vitscale_checkpoint_written_bytes",
                                        "Bytes this rank wrote into checkpoints that completed")
        self.checkpoint_rejected = counter("vitscale_checkpoint_verification_failures",
                                           "Complete checkpoints passed over at resume: a file failed its "
                                           "checksum manifest (missing, cut short or changed)")
        self.checkpoint_last_success = gauge("vitscale_checkpoint_last_success_timestamp_seconds",
                                             "Unix time of the last successful checkpoint save")
        self.device_memory = gauge("vitscale_device_memory_bytes",
                                   "Accelerator memory of this rank (kind=allocated|reserved|"
                                   "peak_allocated on GPUs, resident on CPU-only runs)", ("kind",))
        self.eval_result = gauge("vitscale_eval_result", "Last evaluation result, by metric", ("metric",))
        self.eval_step = gauge("vitscale_eval_step", "Step of the last evaluation")
        # Rank 0's view of all ranks, refreshed every run.log_every steps (straggler panel).
        self.rank_compute_seconds = gauge("vitscale_straggler_compute_seconds",
                                          "Forward compute seconds per step of each rank (mean over the "
                                          "logging window), as gathered by rank 0", ("peer_rank",))
        self.rank_data_wait_seconds = gauge("vitscale_straggler_data_wait_seconds",
                                            "Data-wait seconds per step of each rank (mean over the logging "
                                            "window), as gathered by rank 0", ("peer_rank",))
        self.straggler_ratio = gauge("vitscale_straggler_max_ratio",
                                     "Slowest rank's own time (compute + data wait) divided by the median")
        self.straggler_warnings = counter("vitscale_straggler_warnings",
                                          "Ranks whose own time exceeded metrics.straggler_factor x median")
        self.run_info.labels(**self._labels).info({
            "world_size": str(self.world_size), "local_rank": str(self.local_rank),
            "run": self.run_dir.name, "host": file_sd.socket.gethostname()})
        for family in (self.steps, self.samples, self.tokens, self.nan_skipped_steps, self.checkpoint_failures,
                       self.checkpoint_bytes, self.checkpoint_rejected, self.straggler_warnings):
            family.labels(**self._labels)  # export 0 from the start, so rate() sees the first increase

    def _with(self, family, **extra):
        return family.labels(**self._labels, **extra)

    # -----------------------------------------------------------------------------------------
    # HTTP server and file_sd targets.

    def _start_server(self) -> int | None:
        if self.config.port == 0:
            return None
        port = self.config.port + self.local_rank
        try:
            self._server, _ = start_http_server(port, addr=self.config.address, registry=self.registry)
        except OSError as error:
            # Training matters more than its metrics: warn and go on without this rank's endpoint.
            log.warning("rank %d: cannot serve /metrics on %s:%d (%s); set metrics.port to a free base "
                        "port or 0 to disable", self.rank, self.config.address, port, error.strerror or error)
            return None
        return port

    def _gather_targets(self) -> list[str | None]:
        host = file_sd.advertised_host(self.config.address, self.config.advertise_host)
        mine = file_sd.format_target(host, self.port) if self.port else None
        if self.world_size == 1:
            return [mine]
        if self._gather_objects is None:
            # No process group: only this node's ranks can be known (same host, port + local rank).
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            if local_world < self.world_size and self.rank == 0:
                log.warning("metrics: no process group to gather over; file_sd lists only rank 0's node")
            return [file_sd.format_target(host, self.config.port + lr) if self.port else None
                    for lr in range(local_world)]
        return list(self._gather_objects(mine))

    def _publish_targets(self) -> None:
        if self.config.port == 0:
            return
        targets = self._gather_targets()  # collective: every rank takes part
        if self.rank != 0 or not self.config.file_sd_dir:
            return
        live = [target for target in targets if target]
        missing = [rank for rank, target in enumerate(targets) if not target]
        if missing:
            log.warning("metrics: ranks %s serve no /metrics; file_sd lists the other %d", missing, len(live))
        if len(set(live)) < len(live):
            # Ranks on different nodes bound to loopback all read 127.0.0.1:PORT.
            log.warning("metrics: ranks on several nodes advertise the same address; set metrics.address="
                        "0.0.0.0 (or metrics.advertise_host) so a cluster Prometheus can reach every node")
            live = sorted(set(live))
        path = file_sd.target_file_path(self.config.file_sd_dir, self.job_id, self.run_dir.name)
        labels = {"vitscale_run": self.run_dir.name, "vitscale_world_size": str(self.world_size)}
        try:
            file_sd.write_target_file(path, file_sd.target_groups(live, labels))
        except OSError as error:
            # The other ranks are already training: warn rather than stop rank 0 alone.
            log.warning("metrics: cannot write Prometheus targets to %s (%s); make metrics.file_sd_dir a "
                        "writable directory, or null", path, error.strerror or error)
            return
        self.target_file = path
        log.info("metrics: wrote Prometheus targets for %d ranks to %s", len(live), path)
        record = os.environ.get("VITSCALE_TARGET_RECORD")
        if record:  # the launcher removes the file on every exit path, kill -9 included
            try:
                Path(record).write_text(str(path.resolve()) + "\n")
            except OSError as error:
                log.warning("metrics: cannot note the target file in %s (%s)", record, error.strerror or error)

    # -----------------------------------------------------------------------------------------
    # Recording.

    def record_step(self, step: int, loss: float | None, lr: float, grad_norm: float | None, images: int,
                    tokens: int, step_seconds: float, data_wait_seconds: float, mfu: float | None) -> None:
        """One optimizer step; images/tokens were processed by this rank in this step. Loss and
        gradient norm come on logging steps only (reading them costs a host sync); None keeps
        the last value."""
        self._with(self.steps).inc()
        self._with(self.current_step).set(step)
        self._with(self.samples).inc(images)
        self._with(self.tokens).inc(tokens)
        if loss is not None:
            self._with(self.loss).set(float(loss))
        self._with(self.learning_rate).set(float(lr))
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            self._with(self.grad_norm).set(float(grad_norm))
        self._with(self.step_seconds).observe(step_seconds)
        self._with(self.data_wait_seconds).observe(data_wait_seconds)
        if step_seconds > 0:
            self._with(self.images_per_second).set(images / step_seconds)
            self._with(self.tokens_per_second).set(tokens / step_seconds)
        if mfu is not None:
            self._with(self.mfu).set(float(mfu))
        self._record_device_memory()

    def record_skipped_samples(self, counts: dict[str, int]) -> None:
        """Cumulative counts by reason (as `loader.skipped_samples()` returns them)."""
        for reason, total in counts.items():
            increase = total - self._skipped_totals.get(reason, 0)
            if increase > 0:  # a smaller total (restarted loader) just resets the baseline
                self._with(self.skipped_samples, reason=str(reason)).inc(increase)
            self._skipped_totals[reason] = total

    def record_nan_skip(self) -> None:
        self._with(self.nan_skipped_steps).inc()

    def record_checkpoint(self, seconds: float, ok: bool, written_bytes: int = 0, *,
                          blocked_seconds: float | None = None, background_seconds: float = 0.0) -> None:
        if ok:
            self._with(self.checkpoint_seconds).observe(seconds)
            self._with(self.checkpoint_blocked_seconds).observe(seconds if blocked_seconds is None else blocked_seconds)
            self._with(self.checkpoint_background_seconds).observe(background_seconds)
            self._with(self.checkpoint_last_success).set(time.time())
            self._with(self.checkpoint_bytes).inc(written_bytes)
        else:
            self._with(self.checkpoint_failures).inc()

    def record_rejected_checkpoints(self, count: int) -> None:
        if count:
            self._with(self.checkpoint_rejected).inc(count)

    def record_eval(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if name == "step":
                self._with(self.eval_step).set(float(value))
            else:
                self._with(self.eval_result, metric=str(name)).set(float(value))

    def record_rank_times(self, compute_seconds: list[float], data_wait_seconds: list[float]) -> list:
        """Rank 0, every run.log_every steps: one entry per rank (its forward compute and data wait
        per step); warns about stragglers and returns them."""
        if self.rank != 0 or not compute_seconds:
            return []
        for peer, (seconds, wait) in enumerate(zip(compute_seconds, data_wait_seconds)):
            self._with(self.rank_compute_seconds, peer_rank=str(peer)).set(seconds)
            self._with(self.rank_data_wait_seconds, peer_rank=str(peer)).set(wait)
        stragglers = find_stragglers(list(compute_seconds), list(data_wait_seconds), self.config.straggler_factor)
        own = own_times(list(compute_seconds), list(data_wait_seconds))
        median = statistics.median(own)
        self._with(self.straggler_ratio).set(max(own) / median if median > 0 else 0.0)
        for straggler in stragglers:
            self._with(self.straggler_warnings).inc()
            log.warning(straggler.message())
        return stragglers

    def _record_device_memory(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            self._with(self.device_memory, kind="allocated").set(cuda.memory_allocated())
            self._with(self.device_memory, kind="reserved").set(cuda.memory_reserved())
            self._with(self.device_memory, kind="peak_allocated").set(cuda.max_memory_allocated())

    # -----------------------------------------------------------------------------------------

    def exposition(self) -> str:
        """The /metrics text of this rank (also without a server)."""
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Stop the server and remove rank 0's target file; idempotent, also run at exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self.target_file is not None:
            file_sd.remove_target_file(self.target_file)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "TrainingMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _initialised_cuda():
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _resident_bytes() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return float("nan")
