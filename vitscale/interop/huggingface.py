"""Hugging Face `ViTModel` / `ViTForImageClassification` <-> vitscale.

Differences handled here:
- separate query/key/value projections (HF) vs one fused qkv (vitscale): concatenated/split;
- LayerNorm eps: HF's default is 1e-12 (timm and vitscale: 1e-6); read from config.json, and
  written to it on export, so both sides compute the same function;
- `hidden_act`: "gelu" is exact GELU, "gelu_new"/"gelu_pytorch_tanh" the tanh form;
- `ViTModel`'s pooler (dense + tanh on the [class] token) is the paper's pre-logits layer, so
  it maps to `pre_logits.0` of a headless model; `ViTForImageClassification` has no pooler. A
  headless model without pre-logits is exported with an identity pooler (pooler_act "linear",
  dense = I, bias 0), so a plain `ViTModel.from_pretrained` builds no random layer and its
  pooler_output is the [class] token's representation; import recognises it and drops it;
- parameter names: transformers < 5 (`encoder.layer.N.attention.attention.query`, ...) and
  >= 5 (`layers.N.attention.q_proj`, ...) are both read; export writes the older names, which
  every transformers version loads.
HF's ViT is [class]-token, learned 1-D position, pre-LN only; other vitscale variants are refused
on export with the reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vitscale.errors import CheckpointError
from vitscale.interop.common import Imported, grid_from_positions, shape_fields, to_float32

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# transformers >= 5 names -> the older ones (the layout this module works in).
_RENAMES_V5 = [
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def load_hf(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A saved HF model directory (config.json + model.safetensors or pytorch_model.bin), or a
    bare weights file -> (state_dict, config.json as a dict or None)."""
    from vitscale.interop.io import read_state_dict

    path = Path(path)
    config = None
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} holds neither model.safetensors nor pytorch_model.bin; "
                                  "pass a directory written by save_pretrained()")
        path = weights
    return read_state_dict(path), config


def hf_to_vitscale(state_dict: dict[str, torch.Tensor], hf_config: dict | None = None,
                   source: str = "Hugging Face ViT") -> Imported:
    sd = _old_names(to_float32(state_dict))
    if any(k.endswith("embeddings.distillation_token") for k in sd):
        raise CheckpointError(f"{source} is a Hugging Face DeiT, whose sequence always carries a distillation token "
                              "that vitscale's ViT does not have; convert timm's non-distilled DeiT weights instead")
    prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
    if f"{prefix}embeddings.patch_embeddings.projection.weight" not in sd:
        raise CheckpointError(f"{source} is not a Hugging Face ViT state dict (no embeddings.patch_embeddings."
                              "projection.weight); pass --from for another format")
    take = lambda name: sd.pop(prefix + name)  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    proj = take("embeddings.patch_embeddings.projection.weight")  # (D, C, P, P)
    width, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out["patch_embed.proj.weight"] = proj
    out["patch_embed.proj.bias"] = take("embeddings.patch_embeddings.projection.bias")
    out["cls_token"] = take("embeddings.cls_token")
    out["pos_embed.weight"] = take("embeddings.position_embeddings")
    sd.pop(prefix + "embeddings.mask_token", None)  # only used by masked image modelling
    grid = grid_from_positions(out["pos_embed.weight"].shape[1], 1, source)
    depth = 1 + max(int(m.group(1)) for m in (re.match(rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.", k)
                                                for k in sd) if m)
    for i in range(depth):
        out.update(_block_from_hf(sd, f"{prefix}encoder.layer.{i}.", f"blocks.{i}.", width))
    out["norm.weight"], out["norm.bias"] = take("layernorm.weight"), take("layernorm.bias")
    representation_size, num_classes = None, 0
    if hf_config is not None and hf_config.get("pooler_act") == "linear" and prefix + "pooler.dense.weight" in sd:
        weight, bias = take("pooler.dense.weight"), take("pooler.dense.bias")
        if weight.shape != (width, width) or not torch.equal(weight, torch.eye(width)) or bias.any():
            raise CheckpointError(f"{source}: a linear pooler that is not the identity has no vitscale counterpart "
                                  "(pre-logits use tanh); load it in transformers and drop the pooler")
    if prefix + "pooler.dense.weight" in sd:
        out["pre_logits.0.weight"] = take("pooler.dense.weight")
        out["pre_logits.0.bias"] = take("pooler.dense.bias")
        representation_size = out["pre_logits.0.weight"].shape[0]
    if "classifier.weight" in sd:
        if representation_size:
            raise CheckpointError(f"{source} has both a pooler and a classifier, which no HF ViT class uses together")
        out["head.weight"], out["head.bias"] = sd.pop("classifier.weight"), sd.pop("classifier.bias")
        num_classes = out["head.weight"].shape[0]
    if sd:
        raise CheckpointError(f"{source}: tensors vitscale does not know: {', '.join(sorted(sd)[:4])}")
    mlp_dim = out["blocks.0.mlp.fc1.weight"].shape[0]
    heads = None
    fields = {"image_size": grid * patch, "in_channels": in_channels, "num_classes": num_classes,
              "classifier": "token", "pos_embed": "learned_1d", "norm_position": "pre",
              "representation_size": representation_size, "layer_norm_eps": 1e-12, "mlp_activation": "gelu"}
    if hf_config is not None:
        heads = int(hf_config.get("num_attention_heads", 12))
        fields["layer_norm_eps"] = float(hf_config.get("layer_norm_eps", 1e-12))
        fields["mlp_activation"] = _activation(hf_config.get("hidden_act", "gelu"), source)
        if hf_config.get("pooler_act", "tanh") != "tanh" and representation_size:
            raise CheckpointError(f"{source}: pooler_act {hf_config['pooler_act']!r}; vitscale's pre-logits use tanh")
    shape, unknown = shape_fields(depth=depth, width=width, mlp_dim=mlp_dim, heads=heads, patch_size=patch,
                                  heads_why="a bare state dict has no config.json with num_attention_heads")
    return Imported(out, {**fields, **shape}, source, unknown)


def _activation(name: str, source: str) -> str:
    if name == "gelu":
        return "gelu"
    if name in TANH_GELUS:
        return "gelu_tanh"
    raise CheckpointError(f"{source}: hidden_act {name!r} has no vitscale counterpart (gelu or a tanh GELU)")


def _old_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in sd.items():
        for pattern, replacement in _RENAMES_V5:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


def _block_from_hf(sd: dict, src: str, dst: str, width: int) -> dict[str, torch.Tensor]:
    qkv = [src + f"attention.attention.{n}" for n in ("query", "key", "value")]
    zeros = torch.zeros(width)
    return {
        dst + "norm1.weight": sd.pop(src + "layernorm_before.weight"),
        dst + "norm1.bias": sd.pop(src + "layernorm_before.bias"),
        # (3D, D): rows q, then k, then v, each head-major, as vitscale's rearrange expects.
        dst + "attn.qkv.weight": torch.cat([sd.pop(n + ".weight") for n in qkv]),
        dst + "attn.qkv.bias": torch.cat([sd.pop(n + ".bias", zeros) for n in qkv]),  # qkv_bias=False -> 0
        dst + "attn.proj.weight": sd.pop(src + "attention.output.dense.weight"),
        dst + "attn.proj.bias": sd.pop(src + "attention.output.dense.bias"),
        dst + "norm2.weight": sd.pop(src + "layernorm_after.weight"),
        dst + "norm2.bias": sd.pop(src + "layernorm_after.bias"),
        dst + "mlp.fc1.weight": sd.pop(src + "intermediate.dense.weight"),
        dst + "mlp.fc1.bias": sd.pop(src + "intermediate.dense.bias"),
        dst + "mlp.fc2.weight": sd.pop(src + "output.dense.weight"),
        dst + "mlp.fc2.bias": sd.pop(src + "output.dense.bias"),
    }


# ---------------------------------------------------------------------------------------------
# Export.


def vitscale_to_hf(state_dict: dict[str, torch.Tensor], model_config) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (HF state_dict, config.json dict). A model with a classification head becomes a
    `ViTForImageClassification`; a headless one a `ViTModel` whose pooler is its pre-logits or,
    without them, the identity (so loading initialises nothing at random)."""
    _check_exportable(model_config)
    shape = model_config.shape()
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    classify = model_config.num_classes > 0
    prefix = "vit." if classify else ""
    out = {
        prefix + "embeddings.cls_token": sd["cls_token"],
        prefix + "embeddings.position_embeddings": sd["pos_embed.weight"],
        prefix + "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        prefix + "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        prefix + "layernorm.weight": sd["norm.weight"],
        prefix + "layernorm.bias": sd["norm.bias"],
    }
    for i in range(shape.depth):
        out.update(_block_to_hf(sd, f"blocks.{i}.", f"{prefix}encoder.layer.{i}."))
    if classify:
        out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    elif "pre_logits.0.weight" in sd:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = sd["pre_logits.0.weight"], sd["pre_logits.0.bias"]
    else:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = torch.eye(shape.width), torch.zeros(shape.width)
    return {k: v.contiguous() for k, v in out.items()}, _hf_config(model_config, classify)


def _check_exportable(model_config) -> None:
    problems = {
        "model.classifier": (model_config.classifier != "token", "HF ViT pools the [class] token"),
        "model.pos_embed": (model_config.pos_embed != "learned_1d", "HF ViT has learned 1-D positions"),
        "model.norm_position": (model_config.norm_position != "pre", "HF ViT is pre-LN"),
    }
    for key, (bad, why) in problems.items():
        if bad:
            raise CheckpointError(f"{key}={getattr(model_config, key.split('.')[1])} cannot be exported to "
                                  f"Hugging Face ({why}); export to vitscale safetensors or .npz instead")
    if model_config.num_classes and model_config.head == "pretrain" and model_config.representation_size:
        raise CheckpointError("ViTForImageClassification has no pre-logits layer, and this model has one "
                              f"(representation_size={model_config.representation_size}); export the backbone "
                              "with model.num_classes=0 (a ViTModel whose pooler holds the pre-logits)")


def _block_to_hf(sd: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    q, k, v = sd[src + "attn.qkv.weight"].chunk(3)
    qb, kb, vb = sd[src + "attn.qkv.bias"].chunk(3)
    attn = dst + "attention.attention."
    return {
        dst + "layernorm_before.weight": sd[src + "norm1.weight"],
        dst + "layernorm_before.bias": sd[src + "norm1.bias"],
        attn + "query.weight": q, attn + "query.bias": qb,
        attn + "key.weight": k, attn + "key.bias": kb,
        attn + "value.weight": v, attn + "value.bias": vb,
        dst + "attention.output.dense.weight": sd[src + "attn.proj.weight"],
        dst + "attention.output.dense.bias": sd[src + "attn.proj.bias"],
        dst + "layernorm_after.weight": sd[src + "norm2.weight"], dst + "layernorm_after.bias": sd[src + "norm2.bias"],
        dst + "intermediate.dense.weight": sd[src + "mlp.fc1.weight"],
        dst + "intermediate.dense.bias": sd[src + "mlp.fc1.bias"],
        dst + "output.dense.weight": sd[src + "mlp.fc2.weight"], dst + "output.dense.bias": sd[src + "mlp.fc2.bias"],
    }


def _hf_config(model_config, classify: bool) -> dict:
    shape = model_config.shape()
    config = {
        "architectures": ["ViTForImageClassification" if classify else "ViTModel"],
        "model_type": "vit",
        "hidden_size": shape.width,
        "num_hidden_layers": shape.depth,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.mlp_dim,
        "hidden_act": "gelu_pytorch_tanh" if model_config.mlp_activation == "gelu_tanh" else "gelu",
        "hidden_dropout_prob": model_config.dropout,
        "attention_probs_dropout_prob": model_config.attention_dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": model_config.layer_norm_eps,
        "image_size": shape.image_size,
        "patch_size": shape.patch_size,
        "num_channels": model_config.in_channels,
        "qkv_bias": True,
        "encoder_stride": shape.patch_size,
        "pooler_output_size": model_config.representation_size or shape.width,
        # Without pre-logits the exported pooler is the identity (vitscale_to_hf).
        "pooler_act": "tanh" if classify or model_config.representation_size else "linear",
        "torch_dtype": "float32",
    }
    if classify:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model_config.num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(model_config.num_classes)}
    return config


def save_hf(directory: str | Path, state_dict: dict[str, torch.Tensor], model_config) -> Path:
    """Write config.json + model.safetensors that transformers' from_pretrained() loads."""
    from safetensors.torch import save_file

    tensors, config = vitscale_to_hf(state_dict, model_config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
