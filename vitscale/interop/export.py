"""`vitscale export`: a training checkpoint -> one safetensors file of fp32 weights + the config.

    vitscale export runs/vit_b16_i21k vit_b16.safetensors          # the run's latest complete checkpoint
    vitscale export runs/vit_b16_i21k/checkpoints/step_00093000 vit_b16.safetensors

Works for every engine, ZeRO stage and world size: DCP checkpoints (engine.kind local / fsdp2)
hold the fp32 weights; for DeepSpeed, whenever the checkpoint has optimizer partitions, the
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
    state = read_checkpoint_weights(directory, config)
    state = {name: tensor.float() for name, tensor in state.items()
             if not name.startswith(PRETRAINING_ONLY_PREFIXES)}
    check_state_dict(state, config.model, source=str(directory))
    return state, config


def read_checkpoint_weights(directory: Path, config: "Config") -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 model tensors, whichever engine wrote it."""
    from vitscale.engine.torch_state import is_dcp_checkpoint, read_dcp_weights

    if is_dcp_checkpoint(directory):  # engine.kind local / fsdp2
        from vitscale.model import build_model

        return read_dcp_weights(directory, build_model(config.model).state_dict())
    from vitscale.engine.deepspeed import is_deepspeed_checkpoint, read_deepspeed_weights

    if not is_deepspeed_checkpoint(directory):
        raise CheckpointError(f"{directory} holds neither DeepSpeed nor DCP model files; pick another checkpoint")
    return read_deepspeed_weights(directory)
