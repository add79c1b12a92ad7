"""`vitscale convert`: public ViT weights to and from vitscale's weights file.

    vitscale convert vit_base_patch16_224.safetensors b16.safetensors            # timm -> vitscale
    vitscale convert ./hf-vit-base/ b16.safetensors                               # HF directory -> vitscale
    vitscale convert ViT-B_16.npz b16.safetensors                                 # Google .npz -> vitscale
    vitscale convert b16.safetensors ./hf-out --to hf                             # vitscale -> HF
    vitscale convert b16.safetensors ./timm-out --to timm                         # -> timm local-dir:
    vitscale convert b16.safetensors b16.npz --to npz --layout big_vision         # vitscale -> .npz
    vitscale convert custom_timm.pth out.safetensors model.heads=6 run.name=x     # fill in what the file lacks

The source format is detected (`--from` forces it). Model config fields are read off the source;
what it does not record (timm state dicts have no head count) comes from `model.KEY=VALUE`
overrides, on top of `--config FILE` for the other sections.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from vitscale.errors import CheckpointError
from vitscale.interop.io import FORMATS, detect_format

TARGETS = ("vitscale", "timm", "hf", "npz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="weights: vitscale/timm .safetensors, timm .pth, HF directory, Google .npz")
    parser.add_argument("output", help="file (vitscale, npz) or directory (hf, timm) to write")
    parser.add_argument("--from", dest="source_format", choices=("auto",) + FORMATS, default="auto",
                        help="source format (default: detected)")
    parser.add_argument("--to", dest="target", choices=TARGETS, default="vitscale", help="output format")
    parser.add_argument("--layout", choices=("vision_transformer", "big_vision"), default="vision_transformer",
                        help="key layout of an .npz output")
    parser.add_argument("--config", help="YAML config for the sections a weights file does not describe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. model.heads=6 (needed when the source lacks them)")


def run(args: argparse.Namespace) -> int:
    config = convert(args.source, args.output, source_format=args.source_format, target=args.target,
                     layout=args.layout, config_path=args.config, overrides=args.overrides)
    model, shape = config.model, config.model.shape()
    print(f"wrote {args.output} ({args.target}): ViT {model.name} depth {shape.depth}, width {shape.width}, "
          f"MLP {shape.mlp_dim}, heads {shape.heads}, {shape.image_size}px, classifier {model.classifier}, "
          f"{model.num_classes} classes, {model.mlp_activation}, LayerNorm eps {model.layer_norm_eps:g}")
    if args.target == "npz" and model.mlp_activation != "gelu_tanh":
        print("note: .npz files do not record the activation and Flax ViTs use tanh GELU; read this file back "
              "with model.mlp_activation=gelu to keep exact GELU")
    return 0


def convert(source: str | Path, output: str | Path, *, source_format: str = "auto", target: str = "vitscale",
            layout: str = "vision_transformer", config_path: str | Path | None = None,
            overrides: Sequence[str] = ()):
    """Read `source`, write `output` in `target` format; returns the resolved Config."""
    state_dict, config = import_weights(source, source_format=source_format, config_path=config_path,
                                        overrides=overrides)
    export_weights(output, state_dict, config, target=target, layout=layout)
    return config


def import_weights(source: str | Path, *, source_format: str = "auto", config_path=None, overrides=()):
    """Any supported source -> (vitscale state_dict, validated Config)."""
    from vitscale.interop.common import resolve_config
    from vitscale.interop.huggingface import hf_to_vitscale, load_hf
    from vitscale.interop.io import read_state_dict
    from vitscale.interop.npz import npz_to_vitscale, read_npz
    from vitscale.interop.timm import find_architecture, timm_to_vitscale

    fmt = detect_format(source) if source_format == "auto" else source_format
    name = Path(source).name
    if fmt == "vitscale":
        return _reload_vitscale(source, config_path, overrides)
    if fmt == "timm":
        metadata: dict = {}
        state_dict = read_state_dict(source, metadata)
        imported = timm_to_vitscale(state_dict, source=f"timm {name}", architecture=find_architecture(source, metadata))
    elif fmt == "hf":
        state_dict, hf_config = load_hf(source)
        imported = hf_to_vitscale(state_dict, hf_config, source=f"Hugging Face {name}")
    elif fmt == "npz":
        imported = npz_to_vitscale(read_npz(source), source=name)
    else:
        raise CheckpointError(f"unknown source format {fmt!r}; use one of {', '.join(FORMATS)}")
    config = resolve_config(imported, config_path, overrides)
    return imported.state_dict, config


def _reload_vitscale(source, config_path, overrides):
    """A vitscale file: its own config, with any overrides applied (e.g. run.name)."""
    from vitscale.config import apply_override, config_from_dict
    from vitscale.model.weights import check_state_dict, load_weights

    state_dict, config = load_weights(source)
    if config_path:
        raise CheckpointError("a vitscale weights file carries its config; drop --config (use KEY=VALUE overrides)")
    if overrides:
        raw = config.to_dict()
        for item in overrides:
            apply_override(raw, item)
        config = config_from_dict(raw).validate()
        check_state_dict(state_dict, config.model, source=str(source))
    return state_dict, config


def export_weights(output: str | Path, state_dict, config, *, target: str = "vitscale",
                   layout: str = "vision_transformer") -> Path:
    from vitscale.interop.huggingface import save_hf
    from vitscale.interop.npz import vitscale_to_npz, write_npz
    from vitscale.model.weights import save_weights

    if target == "vitscale":
        return save_weights(output, state_dict, config)
    if target == "hf":
        return save_hf(output, state_dict, config.model)
    if target == "timm":
        from vitscale.interop.timm import save_timm

        return save_timm(output, state_dict, config)
    if target == "npz":
        return write_npz(output, vitscale_to_npz(state_dict, config.model, layout))
    raise CheckpointError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
