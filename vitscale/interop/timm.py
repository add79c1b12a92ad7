"""timm `vit_*` state dicts -> vitscale.

timm's VisionTransformer uses nearly vitscale's names (patch_embed.proj, blocks.N.attn.qkv, ...).
What differs, and how it is handled:
- `pos_embed` is a bare parameter (vitscale: `pos_embed.weight`); with `no_embed_class=True` it has
  no [class] entry, so a zero one is added (the [class] token then gets no position, as in timm).
- LayerScale (`ls1.gamma`, `ls2.gamma`) multiplies a branch's output per channel: folded exactly
  into the preceding linear layer (attn.proj, mlp.fc2).
- `qkv_bias=False` / a bias-free patch projection: zero biases are the same function.
- GAP: timm pools and then normalises (`fc_norm`) by default; vitscale (like big_vision)
  normalises every token and then pools. Only `fc_norm=False` models convert exactly, so
  others are refused with that fix.
- MAP head (`global_pool='map'`): attn_pool.latent/q/kv/proj/norm/mlp -> pool.probe/q/kv/...
Not recorded in a timm state dict: the head count, and with a [class] token whether timm pools it
or averages the patch tokens (`global_pool`). Both come from the timm architecture the source
names (find_architecture: the config.json timm writes beside model.safetensors, a training
checkpoint's "arch", or a timm model name as the file name), built on the meta device through
timm's own registry when timm is installed; else they must be given (model.heads=,
model.classifier=). Never assumed from the width: timm's vit_base_patch16_gap_224 is 768 wide with
16 heads. LayerNorm eps (timm's 1e-6) and the activation (timm's exact GELU) are timm's defaults.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vitscale.errors import CheckpointError
from vitscale.interop.common import Imported, grid_from_positions, is_square, shape_fields, to_float32
from vitscale.interop.io import TIMM_HUB_WEIGHTS, unwrap_state_dict

# Features of some timm ViTs that vitscale's model has no counterpart for -> (what, what to do); the
# model-defining ones first (a relpos model also has fc_norm, yet fc_norm=False would not save it).
PLAIN_ONLY = "only plain ViTs convert exactly"
UNSUPPORTED = {
    r"^(dist_token|head_dist\.)": ("DeiT's distillation token and head (a *_distilled_* model)",
                                   "convert the non-distilled DeiT of the same size"),
    r"(^|\.)(rel_pos|shared_rel_pos)\.": ("VisionTransformerRelPos relative positions (an MLP or table in "
                                         "attention)", "vitscale's pos_embed=relative is a different "
                                         "parameterisation, so these weights cannot be converted"),
    r"^reg_token$": ("register tokens", PLAIN_ONLY),
    r"^norm_pre\.": ("a pre-encoder norm (CLIP-style `pre_norm=True`)", PLAIN_ONLY),
    r"\.(q_norm|k_norm)\.": ("query/key normalisation (`qk_norm=True`)", PLAIN_ONLY),
    r"\.mlp\.norm\.": ("a norm inside the MLP (`scale_mlp_norm=True`)", PLAIN_ONLY),
    r"\.(attn|mlp)\.(w12|w3|gate)": ("a gated (SwiGLU) MLP", PLAIN_ONLY),
    r"^attn_pool\.pos_embed$": ("an attention-pool position embedding", PLAIN_ONLY),
    r"^fc_norm\.": ("pooling before the final norm (`fc_norm`)", "create the timm model with fc_norm=False"),
    r"^patch_embed\.(backbone|norm)\.": ("a hybrid or normalised patch embedding", PLAIN_ONLY),
}


@dataclass(frozen=True)
class TimmArchitecture:
    """What the source says about its timm model beyond the tensors."""

    name: str
    origin: str                # where the name came from, for messages
    heads: int | None
    width: int | None
    global_pool: str | None


def find_architecture(path: str | Path, metadata: dict | None = None) -> TimmArchitecture | None:
    """The timm architecture a weights file names, or None: timm's config.json (beside
    model.safetensors / pytorch_model.bin, or in the directory given), the "arch" a timm training
    checkpoint stores, or the file name when timm's registry knows it
    (vit_base_patch16_224.augreg_in21k.safetensors)."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if (path.is_dir() or path.name in TIMM_HUB_WEIGHTS) and config_file.is_file():
        config = json.loads(config_file.read_text())
        if "architecture" in config:
            return describe(config["architecture"], config.get("model_args") or {}, config.get("global_pool"),
                            str(config_file))
    if metadata and metadata.get("arch"):
        return describe(metadata["arch"], {}, None, f"{path.name}'s arch")
    stem = path.name.split(".")[0]
    timm = _timm()
    if timm is not None and timm.is_model(stem):
        return describe(stem, {}, None, f"the file name {path.name}")
    return None


def describe(name: str, model_args: dict, global_pool: str | None, origin: str) -> TimmArchitecture:
    """Heads, width and pooling of a timm model: from timm's registry (the model built on the meta
    device with the recorded arguments) when timm is installed, else from the arguments alone."""
    timm = _timm()
    if timm is not None and timm.is_model(name):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **model_args)
        except Exception as error:  # TypeError for unknown arguments, AssertionError for bad shapes
            raise CheckpointError(f"{origin}: timm cannot build {name} with {model_args} "
                                  f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                                  "pass model.heads= and model.classifier= instead") from None
        blocks = getattr(model, "blocks", None)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None
        return TimmArchitecture(name, origin, heads, getattr(model, "embed_dim", None),
                                global_pool or getattr(model, "global_pool", None))
    return TimmArchitecture(name, origin, model_args.get("num_heads"), model_args.get("embed_dim"),
                            global_pool or model_args.get("global_pool"))


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


POOLING = {"token": "token", "avg": "gap", "map": "map"}


def _classifier(extra: int, architecture: TimmArchitecture | None, source: str) -> tuple[str | None, str]:
    """(vitscale classifier or None when unknown, why unknown) for a model without a MAP head."""
    if not extra:
        return "gap", ""
    pool = architecture.global_pool if architecture else None
    if pool is None:
        return None, ("a [class] token, which timm pools (global_pool='token': token) or leaves out of the "
                      "average of the patch tokens ('avg': gap)")
    if pool not in POOLING or pool == "map":
        raise CheckpointError(f"{source}: global_pool={pool!r} ({architecture.origin}) has no vitscale "
                              "counterpart; vitscale pools with token, avg (gap) or map")
    return POOLING[pool], ""


def timm_to_vitscale(state_dict: dict[str, torch.Tensor], source: str = "timm",
                     architecture: TimmArchitecture | None = None) -> Imported:
    """A timm VisionTransformer state_dict -> vitscale names and the config fields it records;
    `architecture` (find_architecture) supplies what the tensors cannot."""
    sd = to_float32(unwrap_state_dict(state_dict))
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise CheckpointError(f"{source} is not a timm VisionTransformer state dict (no patch_embed.proj.weight "
                              "or blocks.0.attn.qkv.weight); pass --from for another format")
    for pattern, (feature, advice) in UNSUPPORTED.items():
        hit = next((name for name in sd if re.search(pattern, name)), None)
        if hit is not None:
            raise CheckpointError(f"{source} uses {feature} ({hit}), which vitscale's ViT does not have; {advice}")
    out, fields, unknown = _embeddings(sd, source)
    width, patch, extra = out["patch_embed.proj.weight"].shape[0], fields["patch_size"], int("cls_token" in out)
    depth = 1 + max(int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in sd) if m)
    for i in range(depth):
        out.update(_block(sd, i, width))
    mlp_dim = out["blocks.0.mlp.fc1.weight"].shape[0]
    out["norm.weight"], out["norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")

    if any(k.startswith("attn_pool.") for k in sd):
        latent = sd.pop("attn_pool.latent")
        if latent.shape[1] != 1:
            raise CheckpointError(f"{source}: attention pool with {latent.shape[1]} latents; vitscale's MAP head has 1")
        out["pool.probe"] = latent
        for name in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2"):
            out[f"pool.{name}.weight"] = sd.pop(f"attn_pool.{name}.weight")
            bias = sd.pop(f"attn_pool.{name}.bias", None)
            out[f"pool.{name}.bias"] = bias if bias is not None else torch.zeros(out[f"pool.{name}.weight"].shape[0])
        fields["classifier"] = "map"
    else:
        # Without a [class] token: vitscale's GAP (norm, then mean). With one: what timm's
        # global_pool says, never guessed (a [class] token with average pooling is a timm variant).
        classifier, why = _classifier(extra, architecture, source)
        if classifier is None:
            unknown["classifier"] = why
        else:
            fields["classifier"] = classifier
    fields["class_token"] = bool(extra)

    head = sd.pop("head.weight", None)
    if head is not None:
        out["head.weight"], out["head.bias"] = head, sd.pop("head.bias")
    fields.update(num_classes=head.shape[0] if head is not None else 0, representation_size=None)
    leftover = sorted(k for k in sd if not k.endswith("num_batches_tracked"))
    if leftover:
        raise CheckpointError(f"{source}: tensors vitscale does not know: {', '.join(leftover[:4])}; "
                              "this is not a plain timm ViT")
    heads = None
    if architecture is not None and architecture.heads is not None:
        if architecture.width not in (None, width):
            raise CheckpointError(f"{source}: {architecture.origin} names timm's {architecture.name} (width "
                                  f"{architecture.width}), but the weights are {width} wide; pass model.heads=N "
                                  "for these weights")
        heads = architecture.heads
    why = ("timm state dicts do not, and no timm config.json, checkpoint arch or timm model name as the file "
           "name says which timm model this is")
    shape, unknown_shape = shape_fields(depth=depth, width=width, mlp_dim=mlp_dim, heads=heads, patch_size=patch,
                                        heads_why=why)
    return Imported(out, {**fields, **shape}, source, {**unknown, **unknown_shape})


def _embeddings(sd: dict[str, torch.Tensor], source: str) -> tuple[dict, dict, dict]:
    """Patch projection, [class] token and position table -> (tensors, config fields, unknown)."""
    out: dict[str, torch.Tensor] = {}
    proj = sd.pop("patch_embed.proj.weight")  # (D, C, P, P)
    width, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out["patch_embed.proj.weight"] = proj
    out["patch_embed.proj.bias"] = sd.pop("patch_embed.proj.bias", torch.zeros(width))
    cls = sd.pop("cls_token", None)
    if cls is not None:
        out["cls_token"] = cls
    fields = {"in_channels": in_channels, "patch_size": patch, "norm_position": "pre", "layer_norm_eps": 1e-6,
              "mlp_activation": "gelu"}
    unknown = {}
    pos = sd.pop("pos_embed", sd.pop("pos_embed.weight", None))  # timm, or a bare vitscale state dict
    if pos is not None:
        if cls is not None and is_square(pos.shape[1]):
            pos = torch.cat([torch.zeros(1, 1, width), pos], dim=1)  # no_embed_class: [class] gets no position
        grid = grid_from_positions(pos.shape[1], int(cls is not None), source)
        out["pos_embed.weight"] = pos
        fields.update(image_size=grid * patch, pos_embed="learned_1d")
    else:
        fields["pos_embed"] = "none"
        unknown["image_size"] = "without a position table the input size is not recorded"
    return out, fields, unknown


def _block(sd: dict[str, torch.Tensor], i: int, width: int) -> dict[str, torch.Tensor]:
    src, dst = f"blocks.{i}.", f"blocks.{i}."
    out = {}
    for name in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        weight = sd.pop(src + name + ".weight")
        bias = sd.pop(src + name + ".bias", None)
        out[dst + name + ".weight"] = weight
        out[dst + name + ".bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    # LayerScale: gamma * (W x + b) == (gamma W) x + gamma b, exactly.
    for scale, linear in (("ls1.gamma", "attn.proj"), ("ls2.gamma", "mlp.fc2")):
        gamma = sd.pop(src + scale, None)
        if gamma is not None:
            out[dst + linear + ".weight"] = out[dst + linear + ".weight"] * gamma[:, None]
            out[dst + linear + ".bias"] = out[dst + linear + ".bias"] * gamma
    return out


# ---------------------------------------------------------------------------------------------
# vitscale -> timm: model.safetensors + the config.json timm's save_for_hf writes, so that
# timm.create_model("local-dir:DIR", pretrained=True) rebuilds the model with its weights.

TIMM_BASE_ARCHITECTURE = "vit_base_patch16_224"  # any registered ViT: model_args set every shape
POOL_TO_TIMM = {"token": "token", "gap": "avg", "map": "map"}


def vitscale_to_timm(state_dict: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (timm VisionTransformer state dict, config.json dict). Refused in one line: what timm's
    VisionTransformer cannot express (pre-logits, post-LN, 2-D or relative positions, another eps)."""
    model = config.model
    problems = {
        "model.representation_size": (model.head == "pretrain" and bool(model.representation_size),
                                      "timm's VisionTransformer has no pre-logits layer"),
        "model.norm_position": (model.norm_position != "pre", "timm's ViT is pre-LN"),
        "model.pos_embed": (model.pos_embed not in ("learned_1d", "none"), "timm has learned 1-D positions or none"),
        "model.layer_norm_eps": (model.layer_norm_eps != 1e-6, "timm's ViT LayerNorm eps is 1e-6"),
    }
    for key, (bad, why) in problems.items():
        if bad:
            raise CheckpointError(f"{key}={getattr(model, key.split('.')[1])} cannot be exported to timm ({why}); "
                                  "export to vitscale safetensors instead")
    shape = model.shape()
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    out = {}
    for name, tensor in sd.items():
        if name == "pos_embed.weight":
            out["pos_embed"] = tensor
        elif name.startswith("pool."):
            out["attn_pool.latent" if name == "pool.probe" else "attn_pool." + name.removeprefix("pool.")] = tensor
        else:
            out[name] = tensor
    model_args = {
        "img_size": shape.image_size, "patch_size": shape.patch_size, "in_chans": model.in_channels,
        "num_classes": model.num_classes, "embed_dim": shape.width, "depth": shape.depth,
        "num_heads": shape.heads, "mlp_ratio": shape.mlp_dim / shape.width,
        "class_token": model.has_class_token, "global_pool": POOL_TO_TIMM[model.classifier],
        "fc_norm": False, "pos_embed": "learn" if model.pos_embed == "learned_1d" else "none",
        "act_layer": "gelu_tanh" if model.mlp_activation == "gelu_tanh" else "gelu",
    }
    data = config.data
    timm_config = {
        "architecture": TIMM_BASE_ARCHITECTURE, "num_classes": model.num_classes, "num_features": shape.width,
        "global_pool": model_args["global_pool"], "model_args": model_args,
        "pretrained_cfg": {"input_size": [model.in_channels, shape.image_size, shape.image_size],
                           "num_classes": model.num_classes, "mean": list(data.mean), "std": list(data.std),
                           "interpolation": "bicubic", "crop_pct": 1.0, "fixed_input_size": True,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }
    return {k: v.contiguous() for k, v in out.items()}, timm_config


def save_timm(directory: str | Path, state_dict: dict[str, torch.Tensor], config) -> Path:
    from safetensors.torch import save_file

    tensors, timm_config = vitscale_to_timm(state_dict, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / TIMM_HUB_WEIGHTS[0]))
    (directory / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
    return directory
