"""Training and evaluation loaders over WebDataset shards.

    loader = build_train_loader(cfg.data, micro_batch_size=128, image_size=224, num_classes=21843,
                                rank=rank, world_size=world_size, seed=cfg.run.seed)
    for step, (images, targets) in zip(range(steps), loader): ...
    checkpoint["data"] = loader.state_dict()      # later: loader.load_state_dict(...)

Every sample of an epoch is read exactly once over all ranks and workers (plus fewer than
world_size x micro_batch padding slots so that every rank yields the same number of batches);
see vitscale/data/plan.py for the layout and the resume guarantee. Corrupt samples are skipped,
counted by reason and recorded in a ledger (or stop the run with data.strict=true).

A slot without a real sample (padding, or a skipped sample) stays in its batch as a hole: zeros,
`valid=False`. Nothing is duplicated to fill it; the trainer weights each sample's loss by the
mask so that a step's loss and gradient average over the real samples of the global batch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale.data import plan as planning
from vitscale.data.config import DataConfig
from vitscale.data.decode import Augment, LabelSpec, SampleError, decode_target, image_bytes, load_class_map
from vitscale.data.mixing import mix_batch, soft_targets
from vitscale.data.shards import ShardProblem, expand_shards, iter_shard, shard_name, shard_sample_counts
from vitscale.errors import ConfigError, DataError
from vitscale.signals import ignore_in_worker

STATE_VERSION = 2


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float32, normalised
    targets: torch.Tensor  # (B,) int64, or (B, C) float32 (multi-label or mixed)
    valid: torch.Tensor  # (B,) bool: False for holes (padding slots and skipped samples)
    keys: list[str]  # sample keys, for ledgers and tests
    skipped: dict[str, int] = field(default_factory=dict)  # this reader's counts in this segment
    worker: int = 0


@dataclass(frozen=True)
class StreamSpec:
    """Everything a reader process needs; picklable for DataLoader workers."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    augment: Augment
    labels: LabelSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    rank: int
    topology: planning.Topology
    buffer_size: int
    shuffle_shards: bool
    resampled: bool
    strict: bool
    ledger: str | None
    pad: bool = True
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    counting_problems: tuple[ShardProblem, ...] = ()


class ShardStream(IterableDataset):
    """One epoch segment of one rank; each DataLoader worker reads its own slice."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.epoch, self.history, self.skip_batches = 0, [], 0
        self._plan: tuple[tuple, planning.EpochPlan] | None = None

    def configure(self, epoch: int, history: list[dict], batches_done: int) -> "ShardStream":
        self.epoch, self.history, self.skip_batches = epoch, list(history), batches_done
        return self

    def plan(self) -> planning.EpochPlan:
        """Computed in the main process and kept: DataLoader workers inherit it (no replay each)."""
        spec, key = self.spec, (self.epoch, repr(self.history))
        if self._plan is None or self._plan[0] != key:
            self._plan = key, planning.plan_epoch(self.num_samples(), epoch=self.epoch, topology=spec.topology,
                                                  seed=spec.seed, buffer_size=spec.buffer_size,
                                                  history=self.history, pad=spec.pad)
        return self._plan[1]

    def num_samples(self) -> int:
        return int(np.asarray(self.spec.counts)[self.shard_order()].sum())

    def shard_order(self) -> np.ndarray:
        s = self.spec
        return planning.shard_order(len(s.urls), seed=s.seed, epoch=self.epoch, shuffle=s.shuffle_shards,
                                    resampled=s.resampled)

    def __iter__(self) -> Iterator[Batch | dict]:
        info = get_worker_info()
        plan = self.plan()
        if plan.steps == 0:
            return
        rank_readers = planning.readers(plan.steps, self.spec.topology, self.spec.rank)
        counts = [r.batches for r in rank_readers]
        # The DataLoader starts its round-robin at worker 0; after a resume the next batch is due
        # from reader `first`, so worker i plays reader (i + first) % workers.
        first = planning.next_worker(counts, self.skip_batches)
        worker = ((info.id if info is not None else 0) + first) % len(rank_readers)
        reader = rank_readers[worker]
        done = planning.consumed_per_worker(counts, self.skip_batches)[worker]
        try:
            yield from ReaderRun(self.spec, plan, self.shard_order(), reader, done).batches()
        except DataError as error:  # strict mode: hand the one-line message to the main process
            yield {"error": str(error)}


class ReaderRun:
    """Reads one reader's slots in file order, emits them in shuffle order, decodes, batches."""

    def __init__(self, spec: StreamSpec, plan: planning.EpochPlan, order: np.ndarray, reader: planning.Reader,
                 batches_done: int):
        self.spec, self.plan, self.reader = spec, plan, reader
        self.shard_urls = [spec.urls[i] for i in order]
        counts = np.asarray(spec.counts)[order]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        self.ids = plan.reader_ids(reader)  # sample id per slot, -1 for padding
        self.emit = plan.reader_order(reader, spec.buffer_size, spec.seed)[batches_done * spec.topology.micro_batch:]
        self.first_batch = batches_done
        self.skipped: collections.Counter = collections.Counter()

    def batches(self) -> Iterator[Batch]:
        size = self.spec.topology.micro_batch
        slots = self.read_slots(np.sort(self.emit))
        store: dict[int, dict | ShardProblem] = {}
        entries: list = []
        for slot in self.emit:
            slot = int(slot)
            while slot not in store:
                got_slot, item = next(slots)
                store[got_slot] = item
            entries.append(self.prepare(slot, store.pop(slot)))
            if len(entries) == size:
                yield self.collate(entries, self.first_batch)
                self.first_batch += 1
                entries = []
        assert not entries, "reader lengths are whole batches"

    # -- reading ----------------------------------------------------------------------------

    def read_slots(self, slots: np.ndarray) -> Iterator[tuple[int, dict | ShardProblem]]:
        """(slot, raw sample or problem) in slot order, opening each shard as few times as needed."""
        current, offset, samples = -1, 0, iter(())
        for slot in slots:
            sample_id = int(self.ids[slot])
            if sample_id < 0:  # padding is not read
                yield int(slot), None
                continue
            shard = self._shard_of(sample_id)
            wanted = sample_id - int(self.shard_starts[shard])
            if shard != current or offset > wanted:
                current, offset, samples, ended = shard, 0, iter_shard(self.shard_urls[shard]), None
            item = None
            while offset <= wanted:
                item = next(samples, None) if ended is None else ended
                if isinstance(item, ShardProblem) and not item.slot:
                    if offset == wanted:  # reported by the reader of the slot that follows it: once
                        self.note(item)
                    continue
                if item is None or (isinstance(item, ShardProblem) and not item.key):
                    ended = item or ShardProblem(self.shard_urls[shard], "", "truncated_shard",
                                                 "shard has fewer samples than its index says")
                    item = ended
                    break
                offset += 1
            yield int(slot), item

    # -- decoding ---------------------------------------------------------------------------

    def prepare(self, slot: int, item: dict | ShardProblem):
        """(image, target, key) of a real sample, or a Hole for a padding slot or a skipped sample."""
        sample_id = int(self.ids[slot])
        if sample_id < 0:  # padding keeps batch counts equal: never read, never trained on
            return Hole("")
        seed = sample_seed(self.spec.seed, self.plan.epoch, sample_id)
        if isinstance(item, ShardProblem):
            key = item.key or f"#{sample_id - int(self.shard_starts[self._shard_of(sample_id)])}"
            return self.skip(item.reason, item.shard, key, item.detail)
        try:
            target = decode_target(item, self.spec.labels)
            image = self.spec.augment(image_bytes(item), seed)
        except SampleError as error:
            return self.skip(error.reason, item["__shard__"], item["__key__"], error.detail)
        return image, target, item["__key__"]

    def _shard_of(self, sample_id: int) -> int:
        return int(np.searchsorted(self.shard_starts, sample_id, side="right")) - 1

    def note(self, problem: ShardProblem) -> None:
        """Members that are no sample (e.g. `../x`): counted and recorded, no slot lost."""
        if self.spec.strict:
            raise DataError(f"shard {problem.shard}: {problem.reason} ({problem.detail}); rewrite the shard, "
                            f"or set data.strict=false to skip such members")
        self.skipped[problem.reason] += 1
        append_ledger(self.spec.ledger, {"shard": problem.shard, "key": "", "reason": problem.reason,
                                         "detail": problem.detail[:200], "epoch": self.plan.epoch,
                                         "rank": self.spec.rank, "worker": self.reader.worker})

    def skip(self, reason: str, shard: str, key: str, detail: str) -> "Hole":
        if self.spec.strict:
            raise DataError(f"shard {shard}, sample {key}: {reason} ({detail}); fix or remove it, "
                            f"or set data.strict=false to skip such samples")
        self.skipped[reason] += 1
        append_ledger(self.spec.ledger, {"shard": shard, "key": key, "reason": reason, "detail": detail[:200],
                                         "epoch": self.plan.epoch, "rank": self.spec.rank,
                                         "worker": self.reader.worker})
        return Hole(key)

    def collate(self, entries: list, batch_index: int) -> Batch:
        spec, size = self.spec, self.spec.augment.image_size
        valid = torch.tensor([not isinstance(e, Hole) for e in entries])
        blank = torch.zeros(3, size, size, dtype=torch.uint8)
        images = torch.stack([blank if isinstance(e, Hole) else e[0] for e in entries])  # (B, 3, H, W) uint8
        if spec.labels.multi_label:
            empty = torch.zeros(spec.labels.num_classes, dtype=torch.float32)
            targets = torch.stack([empty if isinstance(e, Hole) else e[1] for e in entries])
        else:
            targets = torch.tensor([0 if isinstance(e, Hole) else e[1] for e in entries], dtype=torch.int64)
        images = normalize(images, spec.mean, spec.std)
        images[~valid] = 0.0  # holes: weight 0 in the loss, zeros (not a real image) to the model
        if (spec.mixup_alpha > 0 or spec.cutmix_alpha > 0) and valid.any():
            key = [spec.seed, self.plan.epoch, self.plan.segment, self.reader.start, batch_index, 0x313]
            rng = np.random.default_rng(key)
            real = valid.nonzero().squeeze(1)  # mixed among real samples only: a hole is no partner
            mixed, soft = mix_batch(images[real], targets[real], num_classes=spec.labels.num_classes,
                                    mixup_alpha=spec.mixup_alpha, cutmix_alpha=spec.cutmix_alpha, rng=rng)
            targets = soft_targets(targets, spec.labels.num_classes)
            images[real], targets[real] = mixed, soft
        keys = [e.key if isinstance(e, Hole) else e[2] for e in entries]
        return Batch(images, targets, valid, keys, dict(self.skipped), self.reader.worker)


@dataclass(frozen=True)
class Hole:
    """A batch slot without a real sample: padding (key "") or a skipped sample (its key)."""

    key: str


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
    out = torch.empty(images.shape, dtype=torch.float32)
    return out.copy_(images).sub_(mean).div_(std)  # in place: 10x faster than fresh temporaries


def append_ledger(path: str | None, record: dict) -> None:
    """One skipped-sample record; O_APPEND keeps each worker's lines whole. No ledger: no-op."""
    if path:
        with open(path, "a") as ledger:
            ledger.write(json.dumps(record) + "\n")


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """Augmentation seed of one sample in one epoch: independent of rank, worker and resume."""
    return int(np.random.SeedSequence([seed, epoch, sample_id, 0]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Main-process loaders.


class _RankLoader:
    """Runs a ShardStream through a DataLoader per epoch segment and keeps the resume state."""

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool, prefetch_factor: int):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch_factor = prefetch_factor
        self.epoch, self.history, self.batches_done = 0, [], 0
        self._skipped_before: collections.Counter = collections.Counter()
        self._skipped_now: dict[int, dict[str, int]] = {}
        self._note_counting_problems()

    def _note_counting_problems(self) -> None:
        """Shards without an index entry that are missing, empty, not tars or cut short have no
        known samples to skip one by one (and a stale index entry was replaced by a count):
        strict mode stops; tolerant mode counts each once (on rank 0) and records it."""
        spec = self.stream.spec
        problems = list(spec.counting_problems)
        problems += [ShardProblem(url, "", "missing_shard", "not found; no index entry")
                     for url, count in zip(spec.urls, spec.counts)
                     if not count and not url.startswith("pipe:") and not os.path.exists(url)]
        for problem in problems:
            if spec.strict and problem.reason != "stale_index":
                raise DataError(f"shard {problem.shard}: {problem.reason} ({problem.detail}); restore or rewrite "
                                f"it, remove it from the shard list, or set data.strict=false to skip it")
            if spec.rank == 0:
                if problem.reason == "stale_index":
                    print(f"warning: shard {problem.shard}: {problem.detail}", flush=True)
                self._skipped_before[problem.reason] += 1
                append_ledger(spec.ledger, {"shard": problem.shard, "key": "", "reason": problem.reason,
                                            "detail": problem.detail[:200], "epoch": 0, "rank": 0, "worker": -1})

    def skipped_samples(self) -> dict[str, int]:
        """Cumulative skipped/corrupt sample counts by reason, on this rank (all workers)."""
        total = collections.Counter(self._skipped_before)
        for counts in self._skipped_now.values():
            total.update(counts)
        return dict(total)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same on every rank)."""
        return self.stream.configure(self.epoch, [], 0).plan().steps

    def _segment(self) -> Iterator[Batch]:
        """The rest of the current epoch segment, in the order the DataLoader yields it."""
        stream = self.stream.configure(self.epoch, self.history, self.batches_done)
        stream.plan()  # here, once: the workers inherit it
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        # A DataLoader draws its workers' base seed from a generator, the global one by default:
        # its own here (the samples' seeds are vitscale's), so that the global RNG dropout uses
        # is not moved by the first batch after a resume, which would make the run diverge.
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=torch.Generator(),
                            pin_memory=self.pin_memory, worker_init_fn=ignore_in_worker, **kwargs)
        for payload in loader:
            if isinstance(payload, dict):
                raise DataError(payload["error"])
            self._skipped_now[payload.worker] = payload.skipped
            self.batches_done += 1
            yield payload
        self._close_segment()

    def _close_segment(self) -> None:
        self._skipped_before = collections.Counter(self.skipped_samples())
        self._skipped_now = {}

    def _topology_record(self) -> dict:
        return self.stream.spec.topology.to_dict()

    def plan_digest(self) -> str:
        """Fingerprint of this rank's epoch plan: ranks that disagree would yield different numbers
        of batches (a hang) or lose samples between their slices."""
        plan = {"order": self.order_settings(), "topology": self._topology_record(), "epoch": self.epoch,
                "history": self.history, "batches_done": self.batches_done, "steps": self.steps_per_epoch}
        return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]

    def order_settings(self) -> dict:
        """Everything that decides which sample comes when: a resume must find them unchanged."""
        spec = self.stream.spec
        return {"seed": spec.seed, "shards": shard_list_digest(spec.urls, spec.counts),
                "samples_per_epoch": int(sum(spec.counts)), "shuffle_buffer": spec.buffer_size,
                "shuffle_shards": spec.shuffle_shards, "resampled": spec.resampled, "pad": spec.pad}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "order": self.order_settings(), "epoch": self.epoch,
                "history": list(self.history), "current": {**self._topology_record(), "batches": self.batches_done},
                "skipped": self.skipped_samples()}

    def load_state_dict(self, state: dict, mode: str = "exact") -> None:
        """mode "exact": continue the saved position (each sample of the epoch once); refused when
        a setting that orders the samples changed. "reset": keep the counts, start a fresh epoch."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError("data loader state is missing or from another version: resume with "
                            "data.resume=reset (model and optimizer resume, the data starts a fresh epoch)")
        if mode == "reset":
            self.epoch, self.history, self.batches_done = int(state["epoch"]) + 1, [], 0
            self._skipped_before, self._skipped_now = collections.Counter(state.get("skipped", {})), {}
            return
        mine, theirs = self.order_settings(), dict(state["order"])
        changed = [f"{key} {theirs.get(key)!r} -> {value!r}" for key, value in mine.items() if theirs.get(key) != value]
        if changed:
            raise DataError(f"the data position was saved with other sample-order settings ({'; '.join(changed)}): "
                            f"an exact resume would repeat or skip samples; restore them, or resume with "
                            f"data.resume=reset to start a fresh epoch on the new data")
        current = dict(state["current"])
        batches = int(current.pop("batches"))
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        if current == self._topology_record():
            self.batches_done = batches
        else:  # new world size, workers or micro-batch: split the rest of the epoch anew
            self.history.append({**current, "batches": batches})
            self.batches_done = 0
        self._skipped_before = collections.Counter(state.get("skipped", {}))
        self._skipped_now = {}


def shard_list_digest(urls, counts) -> str:
    """The shards by name and sample count, in order (not by path: data moved to another mount
    resumes)."""
    text = "\n".join(f"{shard_name(url)}\t{count}" for url, count in zip(urls, counts))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TrainLoader(_RankLoader):
    """Yields (images, targets, valid) forever; epoch e is shuffled from seed + e."""

    def batches(self) -> Iterator[Batch]:
        while True:
            steps = self.stream.configure(self.epoch, self.history, self.batches_done).plan().steps
            if self.batches_done >= steps:  # a state saved at the very end of an epoch
                self._next_epoch()
                continue
            for batch in self._segment():
                if self.batches_done == steps:  # advance before yielding: state_dict is at the next epoch
                    self._next_epoch()
                yield batch

    def _next_epoch(self) -> None:
        self.epoch, self.history, self.batches_done = self.epoch + 1, [], 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.targets, batch.valid


class EvalLoader(_RankLoader):
    """One pass over the held-out shards; yields (images, targets, valid)."""

    def batches(self) -> Iterator[Batch]:
        self.epoch, self.history, self.batches_done = 0, [], 0
        self._skipped_before, self._skipped_now = collections.Counter(), {}
        yield from self._segment()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.targets, batch.valid

    def __len__(self) -> int:
        return self.steps_per_epoch


def build_train_loader(data_cfg: DataConfig, *, micro_batch_size: int, image_size: int, num_classes: int,
                       rank: int, world_size: int, seed: int, run_dir: str | Path | None = None,
                       share: Share | None = None) -> TrainLoader:
    """`share` (the communicator's broadcast_object): rank 0 alone lists and counts the shards
    and every rank uses its answer; without it each rank does so itself (one process, tests)."""
    spec = _stream_spec(data_cfg, data_cfg.train_shards, "data.train_shards", train=True,
                        micro_batch_size=micro_batch_size, image_size=image_size, num_classes=num_classes,
                        rank=rank, world_size=world_size, seed=seed, run_dir=run_dir, share=share)
    return TrainLoader(ShardStream(spec), num_workers=data_cfg.num_workers, pin_memory=data_cfg.pin_memory,
                       prefetch_factor=data_cfg.prefetch_factor)


def build_eval_loader(data_cfg: DataConfig, *, micro_batch_size: int, image_size: int, num_classes: int,
                      rank: int, world_size: int, run_dir: str | Path | None = None,
                      share: Share | None = None) -> EvalLoader:
    spec = _stream_spec(data_cfg, data_cfg.eval_shards, "data.eval_shards", train=False,
                        micro_batch_size=micro_batch_size, image_size=image_size, num_classes=num_classes,
                        rank=rank, world_size=world_size, seed=0, run_dir=run_dir, share=share)
    return EvalLoader(ShardStream(spec), num_workers=data_cfg.num_workers, pin_memory=data_cfg.pin_memory,
                      prefetch_factor=data_cfg.prefetch_factor)


def _stream_spec(cfg: DataConfig, shards: str, key: str, *, train: bool, micro_batch_size: int, image_size: int,
                 num_classes: int, rank: int, world_size: int, seed: int, run_dir, share: Share | None) -> StreamSpec:
    if not 0 <= rank < world_size:
        raise ConfigError("", f"rank {rank} outside world size {world_size}", "check the launcher's environment")
    topology = planning.Topology(world_size, max(1, cfg.num_workers), micro_batch_size)
    urls, counted = _list_and_count(shards, key, cfg, share, rank)
    check_shard_count(len(urls), topology, cfg.few_shards, key)
    counts = counted.counts
    if sum(counts) == 0:
        raise DataError(f"{key}: the shards hold no samples (check them with `vitscale shards check`)")
    augment = Augment(image_size, train, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.hflip, cfg.fast_decode,
                      cfg.max_image_pixels, cfg.eval_crop_fraction,
                      cfg.randaugment_layers if train else 0, cfg.randaugment_magnitude,
                      cfg.exif_orientation == "apply", cfg.jpeg_decoder)
    labels = LabelSpec(num_classes, cfg.multi_label, load_class_map(cfg.class_map))
    return StreamSpec(tuple(urls), tuple(counts), augment, labels, tuple(cfg.mean), tuple(cfg.std), seed, rank,
                      topology, cfg.shuffle_buffer if train else 1, cfg.shuffle_shards and train,
                      cfg.resampled and train, cfg.strict, ledger_path(cfg, run_dir, rank, train),
                      mixup_alpha=cfg.mixup_alpha if train else 0.0, cutmix_alpha=cfg.cutmix_alpha if train else 0.0,
                      counting_problems=tuple(counted.problems))


Share = Callable[[Any], Any]


def _list_and_count(shards: str, key: str, cfg: DataConfig, share: Share | None, rank: int):
    """(urls, ShardCounts): on rank 0 when shared, so every rank plans over the same shard list and
    counts (a shard briefly missing on one node is then a counted hole there, not another plan),
    and the index is read once per job instead of once per rank."""
    if share is None:
        urls = expand_shards(shards, allow_shell=cfg.allow_shell, key=key)
        return urls, shard_sample_counts(urls, cfg.index)
    answer: tuple | str | None = None
    failure: Exception | None = None
    if rank == 0:
        try:
            urls = expand_shards(shards, allow_shell=cfg.allow_shell, key=key)
            answer = (urls, shard_sample_counts(urls, cfg.index))
        except (ConfigError, DataError) as error:
            answer, failure = str(error), error  # every rank stops with rank 0's message
    answer = share(answer)
    if failure is not None:
        raise failure
    if isinstance(answer, str):
        raise DataError(f"on rank 0: {answer}")
    return answer


def check_shard_count(num_shards: int, topology: planning.Topology, policy: str, key: str) -> None:
    readers = topology.world_size * topology.workers
    if num_shards < readers and policy == "refuse":
        raise ConfigError(key, f"{num_shards} shards for {topology.world_size} ranks x {topology.workers} workers "
                               f"= {readers} readers", "write more, smaller shards, lower data.num_workers, or "
                                                        "set data.few_shards=rebalance to split shards by sample")


def ledger_path(cfg: DataConfig, run_dir, rank: int, train: bool) -> str | None:
    """Per-rank ledger file; workers of the rank append whole lines to it."""
    name = f"skipped_samples.{'train' if train else 'eval'}.rank{rank:05d}.jsonl"
    if cfg.skip_ledger:
        base = Path(cfg.skip_ledger)
        path = base / name if base.is_dir() or not base.suffix else base.with_name(f"{base.stem}.{name}")
    elif run_dir is not None:
        path = Path(run_dir) / name
    else:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)
