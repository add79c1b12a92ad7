"""Evaluation on held-out shards: top-1 (multi-label: precision@1) and loss over every rank.

    values = evaluate(model, config, rank=rank, world_size=world, device=device)

`model` may be a DeepSpeed engine (ZeRO-3 gathers its weights inside forward, so every rank must
call this with the same number of batches, which build_eval_loader guarantees) or a plain module.
Each held-out image counts exactly once over the job: padded entries are masked by `valid`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.errors import DataError


def input_dtype(config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.engine.precision, torch.float32)


def evaluate(model: nn.Module, config, *, rank: int, world_size: int, device: torch.device,
             beat: Callable[[], None] = lambda: None) -> dict[str, float]:
    """One pass over data.eval_shards: top-1 (multi-label: precision@1, the top class is one of
    the image's labels) and the loss, summed over every rank's valid images (padding excluded)."""
    import torch.distributed as dist

    from vitscale.data import build_eval_loader

    loader = build_eval_loader(config.data, micro_batch_size=config.engine.micro_batch_size,
                               image_size=config.model.image_size, num_classes=config.model.num_classes,
                               rank=rank, world_size=world_size)
    totals = torch.zeros(3, dtype=torch.float64)  # correct, images, loss sum
    model.eval()
    with torch.no_grad():
        for images, targets, valid in loader:
            beat()
            logits = model(images.to(device, dtype=input_dtype(config))).float().cpu()  # (B, K)
            totals += eval_counts(logits, targets, valid, config.data.multi_label)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    correct, count, loss_sum = totals.tolist()
    if count == 0:
        raise DataError(f"data.eval_shards={config.data.eval_shards!r} yielded no images to evaluate")
    name = "prec@1" if config.data.multi_label else "top1"
    return {name: correct / count, "loss": loss_sum / count, "samples": count}


def eval_counts(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """(correct, valid images, loss sum) for one batch; padded entries (valid False) count nothing."""
    valid = valid.bool()
    predicted = logits.argmax(dim=-1)
    if multi_label:
        hit = targets.gather(1, predicted[:, None]).squeeze(1) > 0.5
        loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").sum(-1)
    else:
        hit = predicted == targets
        loss = F.cross_entropy(logits, targets, reduction="none")
    return torch.tensor([(hit & valid).sum().item(), valid.sum().item(), loss[valid].sum().item()],
                        dtype=torch.float64)
