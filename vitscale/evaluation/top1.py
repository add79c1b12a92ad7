"""Top-1 accuracy of a model on held-out shards.

    result = evaluate_top1(model, build_eval_loader(config.data, ...))   # {"top1": 0.81, "images": 50000}

Padding rows (valid == False, added so that every rank has the same number of batches) are not
counted. Under torch.distributed every rank passes its own loader shard and the counts are
summed over ranks, so each rank returns the global accuracy. Multi-hot targets (multi-label
data) count a hit when the top prediction is one of the image's labels (precision@1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vitscale.errors import DataError


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, batches, *, device: torch.device | str | None = None,
                  max_batches: int | None = None) -> dict[str, float]:
    module = getattr(model, "module", model)  # a DeepSpeed engine or DDP wrapper
    device = torch.device(device) if device is not None else next(module.parameters()).device
    dtype = next(module.parameters()).dtype  # bf16 engines hold bf16 weights: feed them bf16 images
    was_training = module.training
    module.eval()
    correct = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            images, targets = batch[0], batch[1]
            valid = (batch[2] if len(batch) > 2 else torch.ones(len(images), dtype=torch.bool)).bool().cpu()
            predicted = module(images.to(device, dtype=dtype, non_blocking=True)).argmax(dim=-1).cpu()  # (B,)
            correct += count_hits(predicted, targets.cpu(), valid)
            total += valid.sum()
    finally:
        module.train(was_training)
    correct, total = _sum_over_ranks(correct, total, device)
    if total == 0:
        raise DataError("top-1 evaluation read no images (empty shards?); check data.eval_shards")
    return {"top1": (correct / total).item(), "images": int(total.item())}


def count_hits(predicted: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if targets.dim() == 2:  # multi-hot (B, K): is the top class among the labels?
        hits = targets.gather(1, predicted[:, None]).squeeze(1) > 0
    else:
        hits = predicted == targets
    return (hits & valid).sum().double()


def _sum_over_ranks(correct: torch.Tensor, total: torch.Tensor, device: torch.device):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return correct, total
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    both = torch.stack([correct, total]).to(on)
    dist.all_reduce(both)
    return both[0].cpu(), both[1].cpu()
