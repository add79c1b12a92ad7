"""What every importer shares: the `Imported` result, naming a shape after the size table, and
turning read-off fields + the user's config/flags into a validated `Config`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from vitscale.errors import CheckpointError

@dataclass
class Imported:
    """A foreign checkpoint in vitscale terms."""

    state_dict: dict[str, torch.Tensor]  # VisionTransformer's names and layouts
    # ModelConfig structure fields read off the source, None included ("no pre-logits" must
    # override a base config that has them); training fields (dropout, backend) are left alone.
    model: dict[str, Any]
    source: str  # e.g. "timm", "Hugging Face ViTModel", "big_vision .npz"
    # ModelConfig fields the source does not record; the user supplies them as model.KEY=VALUE.
    unknown: dict[str, str] = field(default_factory=dict)  # field -> why it is needed


def shape_fields(*, depth: int, width: int, mlp_dim: int, heads: int | None, patch_size: int,
                 heads_why: str = "") -> tuple[dict, dict]:
    """Model fields for a shape, named after the size table when the width matches a row (so
    `vitscale model` prints "Ti/16"); every number is also set explicitly so that a base config's
    own overrides cannot leak in. The head count is never assumed from the width (timm's
    vit_base_patch16_gap_224 has width 768 and 16 heads): without `heads` it is unknown, and
    `heads_why` says why. Returns (fields, unknown)."""
    from vitscale.model.config import SIZES

    size = next((name for name, row in SIZES.items() if row[1] == width), None)
    fields = {"name": f"{size or 'B'}/{patch_size}", "depth": depth, "width": width, "mlp_dim": mlp_dim,
              "patch_size": patch_size}
    unknown = {}
    if heads is not None:
        fields["heads"] = heads
    else:
        paper = f"; the paper's ViT-{size} of this width has {SIZES[size][3]}" if size else ""
        unknown["heads"] = (heads_why or "the source does not say how the width splits into heads") + paper
    return fields, unknown


def is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def grid_from_positions(positions: int, extra_tokens: int, source: str) -> int:
    """Side of the square patch grid from a position table's length."""
    grid = math.isqrt(positions - extra_tokens)
    if grid * grid != positions - extra_tokens:
        raise CheckpointError(f"{source}: position embedding has {positions} entries, not {extra_tokens} + a "
                              "square grid; only square inputs are supported")
    return grid


def resolve_config(imported: Imported, config_path: str | Path | None = None, overrides: Sequence[str] = ()):
    """defaults <- the YAML file (run, data, ... sections) <- what the source records <- the
    user's `KEY=VALUE` overrides; validated, and checked against the converted state_dict."""
    from vitscale.config import apply_override, config_from_dict, read_yaml_tree
    from vitscale.model.weights import check_state_dict

    raw = read_yaml_tree(Path(config_path)) if config_path else {}
    model = raw.setdefault("model", {})
    if not isinstance(model, dict):
        raise CheckpointError(f"{config_path}: `model` must be a section")
    user_keys = {item.split("=", 1)[0].removeprefix("--") for item in overrides}
    missing = {key: why for key, why in imported.unknown.items()
               if f"model.{key}" not in user_keys and key not in model}
    if missing:
        what = " and ".join(f"model.{key} ({why})" for key, why in missing.items())
        flags = " ".join(f"model.{key}=VALUE" for key in missing)
        raise CheckpointError(f"{imported.source} does not record {what}; pass {'it' if len(missing) == 1 else 'them'}"
                              f" as {flags}")
    model.update(imported.model)
    for item in overrides:
        apply_override(raw, item)
    config = config_from_dict(raw).validate()
    check_state_dict(imported.state_dict, config.model, source=imported.source)
    return config


def to_float32(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state_dict.items():
        tensor = torch.as_tensor(value)
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out
