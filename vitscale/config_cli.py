"""`vitscale config show|check|explain`: print, validate or document the resolved config tree.

    vitscale config explain engine.checkpoint_async     # one field: type, default, value, documentation
    vitscale config explain engine --config configs/vit_h14_jft.yaml   # a whole section, as configured

Imports no torch (the config modules are torch-free), so it answers at once.
"""

from __future__ import annotations

import dataclasses

from vitscale.config import add_config_arguments, dump_config, explain, load_config


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("show", "check", "explain"),
                        help="show: print the resolved tree as YAML; check: validate only; explain [KEY ...]: "
                             "each field's type, default, configured value and documentation (a section or leaf "
                             "key, e.g. engine or optim.lr; none: every field)")
    add_config_arguments(parser)


def run(args) -> int:
    # Words without '=' name the keys to explain; the rest are overrides as for show/check.
    keys = [item for item in args.overrides if "=" not in item] if args.action == "explain" else []
    config = load_config(args.config, [item for item in args.overrides if item not in keys])
    if args.action == "explain":
        print(explain(config, keys), end="")
    elif args.action == "show":
        # The shape a model name implies (H/14: depth 32, width 1280, ...), not null.
        shape = config.model.shape()
        resolved = dataclasses.replace(config, model=dataclasses.replace(
            config.model, depth=shape.depth, width=shape.width, mlp_dim=shape.mlp_dim, heads=shape.heads,
            patch_size=shape.patch_size))
        print(dump_config(resolved), end="")
    else:
        shape = config.model.shape()
        print(f"ok: {config.model.name} depth={shape.depth} width={shape.width} heads={shape.heads} "
              f"tokens={shape.num_patches + (config.model.classifier == 'token')}")
    return 0
