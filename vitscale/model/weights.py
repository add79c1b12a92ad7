"""The vitscale weights file: one safetensors file, fp32 tensors under VisionTransformer's
state_dict names, the resolved config tree as YAML in the file's metadata. No pickle anywhere,
so a weights file from anyone is safe to open.

    save_weights("vit_b16.safetensors", model.state_dict(), config)
    state_dict, config = load_weights("vit_b16.safetensors")
    model, config = load_model("vit_b16.safetensors")

`vitscale export` writes this format from a training checkpoint; `vitscale convert` reads and
writes it; `vitscale eval` and fine-tuning start from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from vitscale.errors import CheckpointError, VitscaleError

FORMAT_NAME = "vitscale-weights"
FORMAT_VERSION = "1"
# Metadata keys; safetensors metadata is a flat str -> str mapping.
META_FORMAT = "vitscale_format"
META_VERSION = "vitscale_format_version"
META_CONFIG = "vitscale_config"


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config) -> Path:
    """Write `state_dict` (floating tensors as fp32) and the resolved `config` (a `Config`) to
    one safetensors file, atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    from vitscale.config import dump_config

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: _portable(name, tensor) for name, tensor in state_dict.items()}
    metadata = {META_FORMAT: FORMAT_NAME, META_VERSION: FORMAT_VERSION, META_CONFIG: dump_config(config)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _portable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor "
                              "(pass model.state_dict() of a VisionTransformer)")
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor.float()
    # Own, contiguous storage: safetensors refuses tensors that share memory (tied views).
    return tensor.contiguous().clone()


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], "Config"]:  # noqa: F821
    """Read a file written by `save_weights`: (state_dict on CPU, validated Config).

    Raises CheckpointError if the file is missing, not safetensors, lacks the vitscale config,
    or holds tensors whose names or shapes do not fit the model that config describes."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory: pass the .safetensors file inside it)" if path.is_dir() else ""
        raise CheckpointError(f"weights file {path} not found{hint}; pass the path `vitscale export` "
                              "or `vitscale convert` wrote")
    tensors, metadata = read_safetensors(path)
    config = _config_from_metadata(path, metadata)
    check_state_dict(tensors, config.model, source=str(path))
    return tensors, config


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the VisionTransformer a weights file describes and load its weights."""
    from vitscale.model.vit import build_model

    state_dict, config = load_weights(path)
    model = build_model(config.model)
    model.load_state_dict(state_dict)
    return model.to(device), config


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Any safetensors file -> (tensors, metadata), with a CheckpointError if it is not one."""
    return _read_safetensors(path, tensors=True)


def read_safetensors_header(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Any safetensors file -> (tensor names, metadata), reading only its header."""
    return _read_safetensors(path, tensors=False)


def _read_safetensors(path: str | Path, *, tensors: bool):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            names = list(handle.keys())
            content = {name: handle.get_tensor(name) for name in names} if tensors else names
    except Exception as error:  # safetensors raises SafetensorError, OSError or ValueError
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line}); "
                              "vitscale weights come from `vitscale export` or `vitscale convert`") from None
    return content, metadata


def _config_from_metadata(path: Path, metadata: dict[str, str]):
    from vitscale.config import config_from_dict

    text = metadata.get(META_CONFIG)
    if text is None:
        raise CheckpointError(f"{path} has no vitscale config in its metadata (a plain safetensors file?); "
                              "import foreign weights with `vitscale convert`")
    version = metadata.get(META_VERSION, FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} is vitscale weights format {version}, this version reads "
                              f"{FORMAT_VERSION}; re-export it with a matching vitscale")
    try:
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ValueError("not a mapping")
        return config_from_dict(raw).validate()
    except VitscaleError as error:
        raise CheckpointError(f"{path}: the stored config is invalid ({error}); re-export the weights") from None
    except (yaml.YAMLError, ValueError) as error:
        raise CheckpointError(f"{path}: the stored config is not a YAML mapping ({error}); "
                              "re-export the weights") from None


def check_state_dict(state_dict: dict[str, torch.Tensor], model_config, *, source: str) -> None:
    """Compare names and shapes with the model `model_config` builds (on the meta device, so no
    memory is spent); raise one CheckpointError listing what does not fit."""
    from vitscale.model.vit import build_model

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_model(model_config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{name} {tuple(state_dict[name].shape)} vs {shape}" for name, shape in expected.items()
                  if name in state_dict and tuple(state_dict[name].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_few(mismatched)} (file vs config)")
    if problems:
        raise CheckpointError(f"{source} does not fit its model config {model_config.name}: "
                              + "; ".join(problems) + "; the weights and the config must come from the same model")


def _few(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
