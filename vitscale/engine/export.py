"""`vitscale export`: a training checkpoint -> one safetensors file of fp32 weights + the config.

    vitscale export runs/vit_b16_i21k vit_b16.safetensors          # the run's latest complete checkpoint
    vitscale export runs/vit_b16_i21k/checkpoints/step_00093000 vit_b16.safetensors

Works for every ZeRO stage and world size: whenever the checkpoint has optimizer partitions, the
exact fp32 master weights are merged from them (DeepSpeed's zero_to_fp32; a bf16 run's module
file holds only rounded weights), with every file read by weights_only loading. Fine-tuning reads
checkpoints through the same `load_checkpoint_weights`. The output
holds only the VisionTransformer's tensors (objective-specific heads such as the masked-patch
predictor are left out) and is read by `vitscale.model.weights.load_weights` without pickle.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from vitscale.errors import CheckpointError, VitscaleError

if TYPE_CHECKING:
    from vitscale.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory (its latest complete checkpoint) or a checkpoint directory")
    parser.add_argument("output", help="the .safetensors file to write")


def run(args: argparse.Namespace) -> int:
    path = export_checkpoint(args.checkpoint, args.output)
    print(f"vitscale export: wrote {path}")
    return 0


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    from vitscale.model.weights import save_weights

    state, config = load_checkpoint_weights(checkpoint)
    return save_weights(output, state, config)


# Parameters objectives attach for pretraining only (masked patch prediction's [mask] + predictor).
PRETRAINING_ONLY_PREFIXES = ("masked_patch.",)


def load_checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """fp32 weights and config of a training checkpoint (a run directory picks its latest
    complete one): from the ZeRO optimizer partitions when there are any (exact fp32 master
    weights, and the only complete copy under ZeRO-3), else from the module states. As with
    exported weights, only the VisionTransformer's tensors are returned (pretraining-only
    extras are dropped), checked against the model the config describes."""
    from vitscale.config import config_from_dict
    from vitscale.engine.checkpoint import resolve_checkpoint
    from vitscale.model.weights import check_state_dict

    directory = resolve_checkpoint(path)
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.yaml; pass a checkpoint written by `vitscale train` "
                              "or weights from `vitscale export`")
    try:
        config = config_from_dict(yaml.safe_load(config_file.read_text()) or {}).validate()
    except VitscaleError as error:
        raise CheckpointError(f"{config_file} is not a valid config ({error})") from None
    if any(directory.glob("*zero_pp_rank_*_optim_states.pt")):
        state = _zero_fp32_weights(directory)
    else:
        state = _module_weights(directory)
    state = {name: tensor.float() for name, tensor in state.items()
             if not name.startswith(PRETRAINING_ONLY_PREFIXES)}
    check_state_dict(state, config.model, source=str(directory))
    return state, config


def _zero_fp32_weights(directory: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of the fp32 partitions (read with weights_only loads)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vitscale.engine.checkpoint import torch_load_weights_only

    try:
        with torch_load_weights_only():
            return get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"{directory}: cannot consolidate its ZeRO partitions ({first_line}); "
                              "resume it with the world size that wrote it, or start from exported weights") from None


def _module_weights(directory: Path) -> dict[str, torch.Tensor]:
    from vitscale.engine.checkpoint import safe_torch_load

    states = safe_torch_load(directory / "mp_rank_00_model_states.pt")
    module = states.get("module") if isinstance(states, dict) else None
    if not module:
        raise CheckpointError(f"{directory} holds no module weights; export them first: vitscale export {directory} weights.safetensors")
    return module
