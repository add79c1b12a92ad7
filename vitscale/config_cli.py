"""`vitscale config show|check`: print or validate the resolved config tree.

Imports no torch (the config modules are torch-free), so it answers at once.
"""

from __future__ import annotations

import dataclasses

from vitscale.config import add_config_arguments, config_from_args, dump_config


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("show", "check"),
                        help="show: print the resolved tree as YAML; check: validate only")
    add_config_arguments(parser)


def run(args) -> int:
    config = config_from_args(args)
    if args.action == "show":
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
