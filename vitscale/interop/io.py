"""Reading foreign weight files safely and telling their format apart."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vitscale.errors import CheckpointError

FORMATS = ("vitscale", "timm", "hf", "npz")


TIMM_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's save_for_hf / the Hub


def read_state_dict(path: str | Path, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a PyTorch file read with `weights_only=True` (tensors and plain
    containers only: a pickle cannot run code here); a timm Hub directory's weights file.
    `metadata` receives a training checkpoint's top-level strings (timm's train.py: "arch")."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in TIMM_HUB_WEIGHTS if (path / name).is_file()), path / TIMM_HUB_WEIGHTS[0])
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found; check the path")
    if path.suffix == ".safetensors":
        from vitscale.model.weights import read_safetensors

        return read_safetensors(path)[0]
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError, zipfile errors, ...
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is neither safetensors nor a plain PyTorch state dict ({first_line}); "
                              "save it with torch.save(model.state_dict()) or as safetensors") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    if metadata is not None:
        metadata.update({k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)})
    return unwrap_state_dict(loaded)


def unwrap_state_dict(state_dict: dict) -> dict:
    """Training checkpoints wrap the weights ({"model": ...}, {"state_dict": ...}, EMA copies
    first) and DDP prefixes names with "module."; -> the bare tensors."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        inner = state_dict.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            state_dict = inner
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def detect_format(path: str | Path) -> str:
    """Guess the source format: vitscale weights, timm, Hugging Face, or a Google .npz."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("model_type") in ("vit", "deit"):  # deit: refused with its reason by the HF reader
            return "hf"
        if "architecture" in config:  # timm's save_for_hf / a timm model on the Hub
            return "timm"
        raise CheckpointError(f"{path} is a directory without a Hugging Face ViT or timm config.json; "
                              "pass a weights file")
    if not path.exists():
        raise CheckpointError(f"{path} not found; check the path")
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors":
        from vitscale.model.weights import META_CONFIG, read_safetensors_header

        names, metadata = read_safetensors_header(path)
        if META_CONFIG in metadata:
            return "vitscale"
        return format_of_keys(names, path)
    return format_of_keys(read_state_dict(path).keys(), path)


def format_of_keys(keys, path) -> str:
    keys = list(keys)
    if any("patch_embed.proj.weight" in k for k in keys):
        return "timm"
    if any("embeddings.patch_embeddings.projection.weight" in k for k in keys):
        return "hf"
    raise CheckpointError(f"cannot tell the format of {path} from its tensor names ({', '.join(keys[:3])}, ...); "
                          "pass --from timm, hf, npz or vitscale")
