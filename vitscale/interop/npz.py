"""The `.npz` checkpoints of google-research/vision_transformer and big_vision <-> vitscale.

Both are flattened Flax parameter trees, keys joined by "/". Their layouts differ:

    google-research/vision_transformer          big_vision
    Transformer/posembed_input/pos_embedding    pos_embedding            (top level)
      covers [class] + patches                    covers patches only: [class] is added after
    encoderblock_N/LayerNorm_0, LayerNorm_2     encoderblock_N/LayerNorm_0, LayerNorm_1
    encoderblock_N/MultiHeadDotProductAttention_1   .../MultiHeadDotProductAttention_0
    encoderblock_N/MlpBlock_3/Dense_0, Dense_1  .../MlpBlock_0/Dense_0, Dense_1
                                                or one scanned `encoderblock/...` with depth first
                                                MAPHead_0/... for attention pooling

Flax stores kernels input-first: Dense (in, out), Conv (P, P, C, D), attention query/key/value
(D, heads, head_dim) and out (heads, head_dim, D). Flax's `nn.gelu` is the tanh approximation and
its LayerNorm eps 1e-6, so imported models get mlp_activation=gelu_tanh. Released files may nest
everything under `params/`, `opt/target/` or `params/img/`; those prefixes are stripped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitscale.errors import CheckpointError
from vitscale.interop.common import Imported, grid_from_positions, is_square, shape_fields

LAYOUTS = {
    "vision_transformer": {"attention": "MultiHeadDotProductAttention_1", "mlp": "MlpBlock_3", "norm2": "LayerNorm_2",
                           "posemb": "Transformer/posembed_input/pos_embedding", "class_has_position": True},
    "big_vision": {"attention": "MultiHeadDotProductAttention_0", "mlp": "MlpBlock_0", "norm2": "LayerNorm_1",
                   "posemb": "pos_embedding", "class_has_position": False},
}
PREFIXES = ("", "params/", "opt/target/", "params/img/")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load an .npz (never unpickling) and strip the wrapper prefix, if any."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; check the path")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise CheckpointError(f"{path} is not a readable .npz of arrays ({str(error).splitlines()[0]}); "
                              "pass a vision_transformer or big_vision checkpoint") from None
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise CheckpointError(f"{path} has no embedding/kernel: not a ViT checkpoint in the Google layout")
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a file object: np.savez would otherwise append ".npz"
        np.savez(handle, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# Import.


def npz_to_vitscale(arrays: dict[str, np.ndarray], source: str = ".npz") -> Imported:
    w = {k: torch.from_numpy(_float32(k, v, source)) for k, v in arrays.items()}
    layout, blocks = _detect_layout(w, source)
    take = w.pop
    out: dict[str, torch.Tensor] = {}
    kernel = take("embedding/kernel")  # (P, P, C, D)
    patch, in_channels, width = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    out["patch_embed.proj.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
    out["patch_embed.proj.bias"] = take("embedding/bias")
    fields: dict = {"in_channels": in_channels, "norm_position": "pre", "layer_norm_eps": 1e-6,
                    "mlp_activation": "gelu_tanh"}
    unknown: dict[str, str] = {}
    extra = 1 if "cls" in w else 0
    if extra:
        out["cls_token"] = take("cls").reshape(1, 1, width)
    posemb = w.pop(LAYOUTS["vision_transformer"]["posemb"], None)
    posemb = w.pop(LAYOUTS["big_vision"]["posemb"], None) if posemb is None else posemb
    if posemb is not None:
        posemb = posemb.reshape(1, -1, width)
        if extra and is_square(posemb.shape[1]):  # big_vision: [class] has no position
            posemb = torch.cat([torch.zeros(1, 1, width), posemb], dim=1)
        grid = grid_from_positions(posemb.shape[1], extra, source)
        out["pos_embed.weight"] = posemb
        fields.update(image_size=grid * patch, pos_embed="learned_1d")
    else:
        why = "no position embedding is stored (big_vision's fixed sincos2d: model.pos_embed=sincos_2d, or none)"
        unknown.update(pos_embed=why, image_size=why)

    names = LAYOUTS[layout]
    heads = None
    for i, block in enumerate(blocks):
        converted, heads = _block_from_flax(block, names, f"blocks.{i}.")
        out.update(converted)
    out["norm.weight"], out["norm.bias"] = take("Transformer/encoder_norm/scale"), take("Transformer/encoder_norm/bias")
    if "MAPHead_0/probe" in w:
        out.update(_map_from_flax(w))
        fields["classifier"] = "map"
    else:
        fields["classifier"] = "token" if extra else "gap"
    representation_size = None
    if "pre_logits/kernel" in w:
        out["pre_logits.0.weight"], out["pre_logits.0.bias"] = take("pre_logits/kernel").T, take("pre_logits/bias")
        representation_size = out["pre_logits.0.weight"].shape[0]
    num_classes = 0
    if "head/kernel" in w and w["head/kernel"].shape[-1] > 0:
        out["head.weight"], out["head.bias"] = take("head/kernel").T, take("head/bias")
        num_classes = out["head.weight"].shape[0]
    w.pop("head/kernel", None), w.pop("head/bias", None)
    fields.update(num_classes=num_classes, representation_size=representation_size)
    if w:
        raise CheckpointError(f"{source}: arrays vitscale does not know: {', '.join(sorted(w)[:4])}; "
                              "only plain ViT checkpoints convert")
    mlp_dim = out["blocks.0.mlp.fc1.weight"].shape[0]
    shape, _ = shape_fields(depth=len(blocks), width=width, mlp_dim=mlp_dim, heads=heads, patch_size=patch)
    return Imported({k: v.contiguous() for k, v in out.items()}, {**fields, **shape},
                    f"{layout} {source}", unknown)


def _float32(name: str, array: np.ndarray, source: str) -> np.ndarray:
    """float32 from float arrays, or from bfloat16 that numpy holds as opaque 2-byte values."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # bfloat16: the top half of a float32
        return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if array.dtype.kind not in "fiu":
        raise CheckpointError(f"{source}: {name} has dtype {array.dtype}, not a number array")
    return np.asarray(array, dtype=np.float32)


def _detect_layout(w: dict[str, torch.Tensor], source: str) -> tuple[str, list[dict[str, torch.Tensor]]]:
    """-> (layout name, one {relative key: tensor} per block), consuming the block tensors."""
    for layout, names in LAYOUTS.items():
        probe = f"{names['attention']}/query/kernel"
        if f"Transformer/encoderblock/{probe}" in w:  # big_vision scan: depth is the leading axis
            keys = [k for k in w if k.startswith("Transformer/encoderblock/")]
            stacked = {k[len("Transformer/encoderblock/"):]: w.pop(k) for k in keys}
            depth = stacked[probe].shape[0]
            return layout, [{k: v[i] for k, v in stacked.items()} for i in range(depth)]
        if f"Transformer/encoderblock_0/{probe}" in w:
            blocks = []
            while f"Transformer/encoderblock_{len(blocks)}/{probe}" in w:
                prefix = f"Transformer/encoderblock_{len(blocks)}/"
                blocks.append({k[len(prefix):]: w.pop(k) for k in [k for k in w if k.startswith(prefix)]})
            return layout, blocks
    raise CheckpointError(f"{source}: no Transformer/encoderblock_0/MultiHeadDotProductAttention_{{0,1}} tensors; "
                          "not a vision_transformer or big_vision ViT")


def _attention_from_flax(p: dict, attention: str) -> tuple[dict[str, torch.Tensor], int]:
    """Flax q/k/v kernels (D, H, hd) and out (H, hd, D) -> fused qkv (3D, D) and proj (D, D)."""
    q = p[f"{attention}/query/kernel"]
    width, heads = q.shape[0], q.shape[1]
    qkv_w = torch.cat([p[f"{attention}/{n}/kernel"].reshape(width, -1).T for n in ("query", "key", "value")])
    qkv_b = torch.cat([p[f"{attention}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
    proj_w = p[f"{attention}/out/kernel"].reshape(-1, width).T
    return {"qkv.weight": qkv_w, "qkv.bias": qkv_b, "proj.weight": proj_w,
            "proj.bias": p[f"{attention}/out/bias"]}, heads


def _block_from_flax(p: dict, names: dict, dst: str) -> tuple[dict[str, torch.Tensor], int]:
    attention, heads = _attention_from_flax(p, names["attention"])
    out = {dst + "attn." + k: v for k, v in attention.items()}
    for norm, flax in (("norm1", "LayerNorm_0"), ("norm2", names["norm2"])):
        out[f"{dst}{norm}.weight"], out[f"{dst}{norm}.bias"] = p[f"{flax}/scale"], p[f"{flax}/bias"]
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        out[f"{dst}mlp.{fc}.weight"] = p[f"{names['mlp']}/{dense}/kernel"].T
        out[f"{dst}mlp.{fc}.bias"] = p[f"{names['mlp']}/{dense}/bias"]
    return out, heads


def _map_from_flax(w: dict) -> dict[str, torch.Tensor]:
    p = {k[len("MAPHead_0/"):]: w.pop(k) for k in [k for k in w if k.startswith("MAPHead_0/")]}
    attention = "MultiHeadDotProductAttention_0"
    width = p[f"{attention}/query/kernel"].shape[0]
    flat = lambda n: p[f"{attention}/{n}/kernel"].reshape(width, -1).T  # noqa: E731
    return {
        "pool.probe": p["probe"].reshape(1, 1, width),
        "pool.q.weight": flat("query"), "pool.q.bias": p[f"{attention}/query/bias"].reshape(-1),
        "pool.kv.weight": torch.cat([flat("key"), flat("value")]),
        "pool.kv.bias": torch.cat([p[f"{attention}/{n}/bias"].reshape(-1) for n in ("key", "value")]),
        "pool.proj.weight": p[f"{attention}/out/kernel"].reshape(-1, width).T,
        "pool.proj.bias": p[f"{attention}/out/bias"],
        "pool.norm.weight": p["LayerNorm_0/scale"], "pool.norm.bias": p["LayerNorm_0/bias"],
        "pool.mlp.fc1.weight": p["MlpBlock_0/Dense_0/kernel"].T, "pool.mlp.fc1.bias": p["MlpBlock_0/Dense_0/bias"],
        "pool.mlp.fc2.weight": p["MlpBlock_0/Dense_1/kernel"].T, "pool.mlp.fc2.bias": p["MlpBlock_0/Dense_1/bias"],
    }


# ---------------------------------------------------------------------------------------------
# Export.


def vitscale_to_npz(state_dict: dict[str, torch.Tensor], model_config,
                    layout: str = "vision_transformer") -> dict[str, np.ndarray]:
    """vitscale weights -> flattened Flax arrays in `layout` ("vision_transformer" or "big_vision")."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown .npz layout {layout!r}; use vision_transformer or big_vision")
    _check_exportable(model_config, layout)
    shape = model_config.shape()
    names, heads, head_dim = LAYOUTS[layout], shape.heads, shape.head_dim
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    cls = sd.get("cls_token")
    if "pos_embed.weight" in sd:
        pos = sd["pos_embed.weight"]
        if cls is not None and not names["class_has_position"]:
            # big_vision adds [class] after the positions: fold its position into the token.
            cls, pos = cls + pos[:, :1], pos[:, 1:]
        out[names["posemb"]] = pos
    if cls is not None:
        out["cls"] = cls
    for i in range(shape.depth):
        out.update(_block_to_flax(sd, f"blocks.{i}.", f"Transformer/encoderblock_{i}/", names, heads, head_dim))
    if model_config.classifier == "map":
        out.update(_map_to_flax(sd, heads, head_dim))
    if "pre_logits.0.weight" in sd:
        out["pre_logits/kernel"], out["pre_logits/bias"] = sd["pre_logits.0.weight"].T, sd["pre_logits.0.bias"]
    if "head.weight" in sd:
        out["head/kernel"], out["head/bias"] = sd["head.weight"].T, sd["head.bias"]
    return {k: np.ascontiguousarray(v.numpy()) for k, v in out.items()}


def _check_exportable(model_config, layout: str) -> None:
    if model_config.norm_position != "pre":
        raise CheckpointError("model.norm_position=post cannot be written as a Google .npz (its ViT is pre-LN); "
                              "export to vitscale safetensors instead")
    if model_config.pos_embed not in ("learned_1d", "none", "sincos_2d"):
        raise CheckpointError(f"model.pos_embed={model_config.pos_embed} has no Google .npz counterpart; "
                              "export to vitscale safetensors instead")
    if model_config.pos_embed == "sincos_2d" and layout != "big_vision":
        raise CheckpointError("model.pos_embed=sincos_2d exists only in the big_vision layout; "
                              "pass --layout big_vision")
    if model_config.classifier == "map" and layout != "big_vision":
        raise CheckpointError("model.classifier=map exists only in the big_vision layout; pass --layout big_vision")
    if model_config.has_class_token and model_config.classifier != "token":
        raise CheckpointError(f"a [class] token with classifier={model_config.classifier} has no Google .npz "
                              "counterpart (a class token there means token pooling); export to vitscale or timm")


def _attention_to_flax(sd: dict, qkv: str, proj: str, heads: int, head_dim: int, dst: str) -> dict[str, torch.Tensor]:
    width = heads * head_dim
    out = {}
    for name, weight, bias in zip(("query", "key", "value"), sd[qkv + ".weight"].chunk(3), sd[qkv + ".bias"].chunk(3)):
        out[f"{dst}{name}/kernel"] = weight.T.reshape(width, heads, head_dim)
        out[f"{dst}{name}/bias"] = bias.reshape(heads, head_dim)
    out[f"{dst}out/kernel"] = sd[proj + ".weight"].T.reshape(heads, head_dim, width)
    out[f"{dst}out/bias"] = sd[proj + ".bias"]
    return out


def _block_to_flax(sd: dict, src: str, dst: str, names: dict, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    out = _attention_to_flax(sd, src + "attn.qkv", src + "attn.proj", heads, head_dim, f"{dst}{names['attention']}/")
    for norm, flax in (("norm1", "LayerNorm_0"), ("norm2", names["norm2"])):
        out[f"{dst}{flax}/scale"], out[f"{dst}{flax}/bias"] = sd[f"{src}{norm}.weight"], sd[f"{src}{norm}.bias"]
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        out[f"{dst}{names['mlp']}/{dense}/kernel"] = sd[f"{src}mlp.{fc}.weight"].T
        out[f"{dst}{names['mlp']}/{dense}/bias"] = sd[f"{src}mlp.{fc}.bias"]
    return out


def _map_to_flax(sd: dict, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    width = heads * head_dim
    attention = "MAPHead_0/MultiHeadDotProductAttention_0/"
    k, v = sd["pool.kv.weight"].chunk(2)
    kb, vb = sd["pool.kv.bias"].chunk(2)
    out = {"MAPHead_0/probe": sd["pool.probe"]}
    for name, weight, bias in (("query", sd["pool.q.weight"], sd["pool.q.bias"]), ("key", k, kb), ("value", v, vb)):
        out[f"{attention}{name}/kernel"] = weight.T.reshape(width, heads, head_dim)
        out[f"{attention}{name}/bias"] = bias.reshape(heads, head_dim)
    out[f"{attention}out/kernel"] = sd["pool.proj.weight"].T.reshape(heads, head_dim, width)
    out[f"{attention}out/bias"] = sd["pool.proj.bias"]
    out["MAPHead_0/LayerNorm_0/scale"], out["MAPHead_0/LayerNorm_0/bias"] = sd["pool.norm.weight"], sd["pool.norm.bias"]
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        out[f"MAPHead_0/MlpBlock_0/{dense}/kernel"] = sd[f"pool.mlp.{fc}.weight"].T
        out[f"MAPHead_0/MlpBlock_0/{dense}/bias"] = sd[f"pool.mlp.{fc}.bias"]
    return out
