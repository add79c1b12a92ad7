"""`vitscale export`: a training checkpoint -> one safetensors file of fp32 weights + the config.

    vitscale export runs/vit_b16_i21k vit_b16.safetensors          # the run's latest complete checkpoint
    vitscale export runs/vit_b16_i21k/checkpoints/step_00093000 vit_b16.safetensors

Works for every ZeRO stage and world size: the fp32 master weights are merged from the ranks'
partitions (DeepSpeed's zero_to_fp32), with every file read by weights_only loading. The output
holds only the VisionTransformer's tensors (objective-specific heads such as the masked-patch
predictor are left out) and is read by `vitscale.model.weights.load_weights` without pickle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vitscale.engine import checkpoint as ckpt
from vitscale.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory (its latest complete checkpoint) or a checkpoint directory")
    parser.add_argument("output", help="the .safetensors file to write")


def run(args: argparse.Namespace) -> int:
    path = export_checkpoint(args.checkpoint, args.output)
    print(f"vitscale export: wrote {path}")
    return 0


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    from vitscale.config import load_config
    from vitscale.model import build_model
    from vitscale.model.weights import save_weights

    directory = ckpt.resolve_checkpoint(checkpoint)
    config = load_config(directory / "config.yaml")
    state = fp32_state_dict(directory, config.engine.zero_stage)
    model = build_model(config.model)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise CheckpointError(f"{directory} lacks weights for {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}; is it a vitscale training checkpoint?")
    model.load_state_dict({name: state[name] for name in wanted})
    return save_weights(output, model.state_dict(), config)


def fp32_state_dict(directory: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights: merged from ZeRO partitions (stages 1-3), or the module file."""
    if zero_stage == 0:
        module = ckpt.safe_torch_load(directory / "mp_rank_00_model_states.pt").get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{directory}/mp_rank_00_model_states.pt holds no module weights")
        return {name: tensor.float() for name, tensor in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with ckpt.torch_load_weights_only():
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
    return {name: tensor.float() for name, tensor in state.items()}
