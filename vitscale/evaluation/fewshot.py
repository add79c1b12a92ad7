"""Few-shot linear evaluation, as in the ViT paper: freeze the model, take the representations of
k images per class, solve a regularised least-squares regression to {-1, 1}^K targets in closed
form, and report the accuracy of its argmax on held-out images.

    accuracy = fewshot_accuracy(model, train_batches, test_batches, shots=(1, 5, 10, 25))
    # {"fewshot_1shot": 0.41, "fewshot_5shot": 0.72, ...}

`train_batches` / `test_batches` are an eval loader's batches `(images, labels, valid)` (e.g.
`vitscale.data.build_eval_loader` over the training and held-out shards), any iterable of
`(images, labels)`, or one `(images, labels)` pair of tensors. Every evaluation during a run sees
the same images. Features are standardised with the few-shot set's statistics and get a large
constant bias column (so the bias is nearly unregularised); the regression is solved in float64.

Two protocols choose the k images and the ridge coefficient:
- big_vision (the default, what reported numbers use): for each of 3 seeds, numpy's
  default_rng(seed) permutes every class's training images (all that were read) and the first k
  are the few-shot set; l2 is fixed at 2^10; the accuracy is the mean over the seeds. This is
  big_vision's evaluators/fewshot_lsr.py with its common config.
- loo: the first k images per class in reading order; with `l2_reg=None` the coefficient is
  chosen from a grid by leave-one-out accuracy on the few-shot set itself (closed form), never by
  looking at the test images. At 1-shot every left-out image is its class's only one, so the
  choice falls to the grid's largest value.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
import torch

from vitscale.errors import DataError

PAPER_SHOTS = (1, 5, 10, 25)
PROTOCOLS = ("big_vision", "loo")
BIG_VISION_L2 = 2.0 ** 10  # big_vision's configs/common.py few-shot default
BIG_VISION_SEEDS = 3
L2_GRID = tuple(2.0 ** e for e in range(-6, 14, 2))
BIAS_CONSTANT = 100.0  # the bias column's value: large, so its weight is barely regularised


# ---------------------------------------------------------------------------------------------
# The linear algebra: features in, accuracy out.


def linear_fewshot_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                            test_features: torch.Tensor, test_labels: torch.Tensor, *, shots: int,
                            l2_reg: float | None = None) -> float:
    """Accuracy on `test_*` of ridge regression to {-1, 1} targets fitted on the first `shots`
    examples of each class in `train_*` (features (N, D), integer labels (N,))."""
    x, y = select_shots(train_features, train_labels, shots)
    classes = torch.unique(y)  # sorted; a class absent from training is never predicted
    return ridge_accuracy(x, y, test_features, test_labels, classes, l2_reg)


def big_vision_fewshot_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                                test_features: torch.Tensor, test_labels: torch.Tensor, *, shots: int,
                                num_classes: int, l2_reg: float = BIG_VISION_L2,
                                seeds: int = BIG_VISION_SEEDS) -> list[float]:
    """big_vision's protocol (evaluators/fewshot_lsr.py), one accuracy per seed: for seed s,
    numpy's default_rng(s) permutes each class's training images and the first `shots` of each
    permutation are the few-shot set; the ridge coefficient is fixed; targets are {-1, 1} over
    all `num_classes` classes."""
    labels = _integer_labels(train_labels)
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(num_classes)]
    short = next((c for c, members in enumerate(by_class) if 0 < len(members) < shots), None)
    if short is not None:
        raise DataError(f"few-shot: class {short} has {len(by_class[short])} training images, {shots}-shot needs "
                        f"{shots}; lower the shots or read more training images")
    accuracies = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        chosen = np.concatenate([rng.permutation(members)[:shots] for members in by_class])
        index = torch.from_numpy(chosen).long()
        accuracies.append(ridge_accuracy(train_features[index], labels[index], test_features, test_labels,
                                         torch.arange(num_classes), l2_reg))
    return accuracies


def ridge_accuracy(x: torch.Tensor, y: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor,
                   classes: torch.Tensor, l2_reg: float | None) -> float:
    """Standardise with the few-shot set's statistics, add the bias column, fit {-1, 1} targets
    over `classes` with ridge `l2_reg` (None: leave-one-out choice), score argmax on the test set."""
    targets = 2.0 * (y[:, None] == classes[None, :]).double() - 1.0  # (n, K) in {-1, 1}
    mean, std = x.double().mean(0, keepdim=True), x.double().std(0, unbiased=False, keepdim=True) + 1e-5
    design = with_bias((x.double() - mean) / std)  # (n, D + 1)
    test = with_bias((test_features.double() - mean) / std)
    if l2_reg is None:
        l2_reg = choose_l2_reg(design, targets)
    weights = ridge_solve(design, targets, l2_reg)  # (D + 1, K)
    predicted = classes[(test @ weights).argmax(dim=1)]
    return (predicted == test_labels.to(predicted.device)).double().mean().item()


def select_shots(features: torch.Tensor, labels: torch.Tensor, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `shots` rows of every class present, in their original order."""
    labels = _integer_labels(labels)
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        if len(members) < shots:
            raise DataError(f"few-shot: class {int(cls)} has {len(members)} training images, {shots}-shot needs "
                            f"{shots}; lower the shots or read more training images")
        keep[members[:shots]] = True
    return features[keep], labels[keep]


def with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_full((x.shape[0], 1), BIAS_CONSTANT)], dim=1)


def ridge_solve(x: torch.Tensor, y: torch.Tensor, l2_reg: float) -> torch.Tensor:
    """argmin_w |x w - y|^2 + l2_reg |w|^2 = (x^T x + l2_reg I)^-1 x^T y, in the cheaper of the
    primal (D x D) or dual (n x n) form: few-shot sets are often smaller than the width."""
    n, d = x.shape
    if n < d:
        return x.T @ torch.linalg.solve(x @ x.T + l2_reg * torch.eye(n, dtype=x.dtype), y)
    return torch.linalg.solve(x.T @ x + l2_reg * torch.eye(d, dtype=x.dtype), x.T @ y)


def choose_l2_reg(x: torch.Tensor, y: torch.Tensor, grid: Sequence[float] = L2_GRID) -> float:
    """The grid value with the best leave-one-out accuracy on the few-shot set. With the thin SVD
    x = U S V^T the ridge hat matrix is H = U diag(s^2 / (s^2 + l2)) U^T, so every grid value
    costs O(n r K) (r = min(n, D)) and no n x n matrix is formed; the held-out prediction of row
    i is (H y)_i - H_ii (y_i - (H y)_i) / (1 - H_ii). Ties go to the stronger regulariser."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)  # u (n, r), s (r,)
    projected = u.T @ y  # (r, K)
    truth = y.argmax(dim=1)
    best, best_accuracy = grid[-1], -1.0
    for l2_reg in sorted(grid, reverse=True):
        shrink = s ** 2 / (s ** 2 + l2_reg)  # (r,)
        fitted = u @ (shrink[:, None] * projected)  # (n, K) = H y
        leverage = ((u ** 2) @ shrink).clamp(max=1 - 1e-9)[:, None]  # diag(H)
        held_out = fitted - leverage * (y - fitted) / (1 - leverage)
        accuracy = (held_out.argmax(dim=1) == truth).double().mean().item()
        if accuracy > best_accuracy:
            best, best_accuracy = l2_reg, accuracy
    return best


def _integer_labels(labels: torch.Tensor) -> torch.Tensor:
    if labels.dim() != 1 or labels.is_floating_point():
        raise DataError("few-shot evaluation needs one integer class per image; multi-label (multi-hot) data "
                        "has no few-shot protocol here: evaluate on a single-label dataset")
    return labels.long().cpu()


# ---------------------------------------------------------------------------------------------
# From a model and images.


@torch.no_grad()
def extract_representations(model: torch.nn.Module, batches, *, per_class_limit: int | None = None,
                            num_classes: int | None = None, max_images: int | None = None,
                            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen representations `model.forward_representation(images)` -> (features (N, D) float32
    on CPU, labels (N,)). `per_class_limit` keeps only the first that many images of each class
    (only those go through the model); with `num_classes` known, reading stops once every class
    is full. `max_images` caps the total. The model's train/eval mode is restored afterwards."""
    module = getattr(model, "module", model)  # a DeepSpeed engine or DDP wrapper
    device = torch.device(device) if device is not None else next(module.parameters()).device
    dtype = next(module.parameters()).dtype  # bf16 engines hold bf16 weights: feed them bf16 images
    was_training = module.training
    module.eval()
    features, labels, counts = [], [], {}
    taken = 0
    try:
        for images, batch_labels, valid in _as_batches(batches):
            batch_labels = _integer_labels(batch_labels)
            keep = valid.clone().bool().cpu()
            if per_class_limit is not None:
                for i, label in enumerate(batch_labels.tolist()):
                    if keep[i]:
                        keep[i] = counts.get(label, 0) < per_class_limit
                        counts[label] = counts.get(label, 0) + int(keep[i])
            if max_images is not None:
                keep &= torch.cumsum(keep.long(), 0) <= max_images - taken
            if keep.any():
                chosen = images[keep.to(images.device)].to(device, dtype=dtype, non_blocking=True)
                features.append(module.forward_representation(chosen).float().cpu())
                labels.append(batch_labels[keep])
                taken += int(keep.sum())
            if max_images is not None and taken >= max_images:
                break
            if per_class_limit is not None and num_classes is not None and len(counts) >= num_classes \
                    and min(counts.values()) >= per_class_limit:
                break
    finally:
        module.train(was_training)
    if not features:
        raise DataError("few-shot: no images were read (empty shards or loader)")
    return torch.cat(features), torch.cat(labels)


def _as_batches(batches) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels) tensors, or an iterable of (images, labels[, valid]) -> uniform triples."""
    if isinstance(batches, (tuple, list)) and len(batches) in (2, 3) and isinstance(batches[0], torch.Tensor) \
            and batches[0].dim() == 4:
        images, labels = batches[0], batches[1]
        for start in range(0, len(images), 256):
            part = slice(start, start + 256)
            yield images[part], labels[part], torch.ones(len(images[part]), dtype=torch.bool)
        return
    for batch in batches:
        images, labels = batch[0], batch[1]
        valid = batch[2] if len(batch) > 2 else torch.ones(len(images), dtype=torch.bool)
        yield images, labels, valid


def fewshot_accuracy(model: torch.nn.Module, train_batches, test_batches, *, shots: Sequence[int] = PAPER_SHOTS,
                     l2_reg: float | None = None, max_test_images: int | None = None,
                     num_classes: int | None = None, device: torch.device | str | None = None,
                     protocol: str = "big_vision", seeds: int = BIG_VISION_SEEDS,
                     max_train_images_per_class: int | None = None) -> dict[str, float]:
    """{"fewshot_{k}shot": accuracy} for each k in `shots`: few-shot linear evaluation of `model`'s
    frozen representations. protocol="big_vision": k random images per class from every image read
    (at most `max_train_images_per_class`), l2_reg fixed (default 1024), the mean over `seeds`
    seeds; "loo": the first k per class, l2_reg chosen by leave-one-out when None."""
    shots = sorted(set(int(k) for k in shots))
    if not shots or shots[0] < 1:
        raise DataError(f"few-shot: shots must be positive integers, got {shots}")
    if protocol not in PROTOCOLS:
        raise DataError(f"few-shot: unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    limit = shots[-1] if protocol == "loo" else max_train_images_per_class
    train_x, train_y = extract_representations(model, train_batches, per_class_limit=limit,
                                               num_classes=num_classes, device=device)
    test_x, test_y = extract_representations(model, test_batches, max_images=max_test_images, device=device)
    if protocol == "loo":
        return {f"fewshot_{k}shot": linear_fewshot_accuracy(train_x, train_y, test_x, test_y, shots=k, l2_reg=l2_reg)
                for k in shots}
    classes = num_classes or int(train_y.max()) + 1
    return {f"fewshot_{k}shot": float(np.mean(big_vision_fewshot_accuracy(
        train_x, train_y, test_x, test_y, shots=k, num_classes=classes,
        l2_reg=BIG_VISION_L2 if l2_reg is None else l2_reg, seeds=seeds))) for k in shots}


@dataclasses.dataclass
class FewShotEvaluator:
    """Periodic few-shot evaluation from shards, for the training loop:

        evaluator = FewShotEvaluator.from_config(config)      # None unless fewshot.every > 0
        if evaluator and step % config.fewshot.every == 0:
            metrics.record_eval(evaluator.evaluate(model))    # {"fewshot_5shot": ..., ...}

    Each call streams the few-shot training shards (loo: until max(shots) images per class are
    read, only those go through the model; big_vision: all of them, or max_train_images_per_class
    per class) and up to `max_test_images` held-out images. It reads the
    whole data on the calling process: call it on every rank (same result everywhere; needed
    with ZeRO-3, whose forward pass is collective) or on rank 0 alone with ZeRO-0/1/2."""

    data: object  # DataConfig: decoding, normalisation and worker settings
    train_shards: str
    test_shards: str
    image_size: int
    num_classes: int
    shots: Sequence[int] = PAPER_SHOTS
    micro_batch_size: int = 64
    max_test_images: int | None = 10_000
    l2_reg: float | None = None
    every: int = 0                 # in the training loop: run every this many steps
    protocol: str = "big_vision"
    seeds: int = BIG_VISION_SEEDS
    max_train_images_per_class: int | None = None
    name = "few-shot"
    at_end = False

    @classmethod
    def from_config(cls, config) -> "FewShotEvaluator | None":
        """The evaluator the config's `fewshot` section describes, or None when it is off."""
        section = config.fewshot
        if not section.every:
            return None
        return cls(config.data, train_shards=section.train_shards, test_shards=section.test_shards,
                   image_size=config.model.image_size, num_classes=section.num_classes or config.model.num_classes,
                   shots=tuple(section.shots), micro_batch_size=section.micro_batch_size,
                   max_test_images=section.max_test_images, l2_reg=section.l2_reg, every=section.every,
                   protocol=section.protocol, seeds=section.seeds,
                   max_train_images_per_class=section.max_train_images_per_class)

    def loader(self, shards: str, share=None):
        """Every rank reads all of it; with `share`, over rank 0's shard list and counts, so all
        ranks score the same number of batches (their forwards may be collective)."""
        from vitscale.data import build_eval_loader

        data = dataclasses.replace(self.data, eval_shards=shards, multi_label=False)
        return build_eval_loader(data, micro_batch_size=self.micro_batch_size, image_size=self.image_size,
                                 num_classes=self.num_classes, rank=0, world_size=1, share=share)

    def run(self, engine, beat) -> dict[str, float]:
        """In the loop: every rank scores the whole few-shot data (ZeRO-3's and FSDP2's forward is
        collective; elsewhere it keeps the ranks in step for the next collective)."""
        beat()
        with engine.autocast():
            values = self.evaluate(engine.module, device=engine.device, share=engine.comm.broadcast_object)
        beat()
        return values

    def evaluate(self, model: torch.nn.Module, device: torch.device | str | None = None, share=None
                 ) -> dict[str, float]:
        return fewshot_accuracy(model, self.loader(self.train_shards, share), self.loader(self.test_shards, share),
                                shots=self.shots, l2_reg=self.l2_reg, max_test_images=self.max_test_images,
                                num_classes=self.num_classes, device=device, protocol=self.protocol,
                                seeds=self.seeds, max_train_images_per_class=self.max_train_images_per_class)
