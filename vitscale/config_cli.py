"""`vitscale config show|check`: print or validate the resolved config tree."""

from __future__ import annotations

from vitscale.config import add_config_arguments, config_from_args, dump_config


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("show", "check"),
                        help="show: print the resolved tree as YAML; check: validate only")
    add_config_arguments(parser)


def run(args) -> int:
    config = config_from_args(args)
    if args.action == "show":
        print(dump_config(config), end="")
    else:
        shape = config.model.shape()
        print(f"ok: {config.model.name} depth={shape.depth} width={shape.width} heads={shape.heads} "
              f"tokens={shape.num_patches + (config.model.classifier == 'token')}")
    return 0
