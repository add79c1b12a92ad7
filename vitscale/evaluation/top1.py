"""Top-1 accuracy and loss on held-out shards; the one evaluator of the loop and of `vitscale eval`.

    result = evaluate_top1(model, build_eval_loader(config.data, ...))
    # {"top1": 0.81, "loss": 0.93, "samples": 50000}      multi-hot targets: "prec@1" instead of "top1"

Padding rows (valid == False, added so that every rank has the same number of batches) count
nothing. Single-label targets are class ids (softmax cross-entropy); multi-hot targets (B, K)
score a hit when the top class is one of the image's labels (precision@1) and the sigmoid
cross-entropy summed over classes. Counts stay on the device until the end; with `reduce`
(the engine's `comm.host_reduce`) they are summed over ranks, so each rank returns the global
numbers. Under ZeRO-3 / FSDP2 the forward is collective: every rank must call this with the
same number of batches, which the eval loader's padding guarantees.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vitscale.errors import DataError

Reduce = Callable[[Sequence[torch.Tensor], str], list[float]]


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, batches, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, reduce: Reduce | None = None, max_batches: int | None = None,
                  beat: Callable[[], None] = lambda: None) -> dict[str, float]:
    module = getattr(model, "module", model)  # a DeepSpeed engine or DDP wrapper
    device = torch.device(device) if device is not None else next(module.parameters()).device
    dtype = dtype or next(module.parameters()).dtype  # bf16 engines hold bf16 weights: feed them bf16 images
    was_training = module.training
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # hits, valid images, loss sum
    multi_label = False
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            beat()
            images, targets = batch[0], batch[1].to(device, non_blocking=True)
            valid = batch[2] if len(batch) > 2 else torch.ones(len(images), dtype=torch.bool)
            multi_label = targets.dim() == 2
            logits = module(images.to(device, dtype=dtype, non_blocking=True)).float()  # (B, K)
            totals += batch_counts(logits, targets, valid.to(device).bool())
    finally:
        module.train(was_training)
    hits, count, loss_sum = reduce(list(totals), "sum") if reduce is not None else totals.tolist()
    if count == 0:
        raise DataError("top-1 evaluation read no images (empty shards?); check data.eval_shards")
    return {"prec@1" if multi_label else "top1": hits / count, "loss": loss_sum / count, "samples": int(count)}


def batch_counts(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(hits, valid images, loss sum) of one batch as a float64 vector on the logits' device."""
    predicted = logits.argmax(dim=-1)
    if targets.dim() == 2:  # multi-hot (B, K): is the top class among the labels?
        hit = targets.gather(1, predicted[:, None]).squeeze(1) > 0.5
        loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").sum(-1)
    else:
        hit = predicted == targets
        loss = F.cross_entropy(logits, targets, reduction="none")
    return torch.stack([(hit & valid).sum().double(), valid.sum().double(),
                        torch.where(valid, loss, torch.zeros_like(loss)).sum().double()])


class TopOneEvaluation:
    """The loop's periodic held-out evaluation (engine.eval_every steps and at the end)."""

    name = "eval"

    def __init__(self, config, *, rank: int, world_size: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.every, self.at_end = config.engine.eval_every, True

    @classmethod
    def from_config(cls, config, *, rank: int, world_size: int) -> "TopOneEvaluation | None":
        if not config.data.eval_shards or config.run.objective != "classification":
            return None
        return cls(config, rank=rank, world_size=world_size)

    def run(self, engine, beat: Callable[[], None]) -> dict[str, float]:
        from vitscale.data import build_eval_loader

        config = self.config
        loader = build_eval_loader(config.data, micro_batch_size=config.engine.micro_batch_size,
                                   image_size=config.model.image_size, num_classes=config.model.num_classes,
                                   rank=self.rank, world_size=self.world_size, share=engine.comm.broadcast_object)
        with engine.autocast():
            return evaluate_top1(engine.module, loader, device=engine.device, dtype=engine.input_dtype,
                                 reduce=engine.comm.host_reduce, beat=beat)
