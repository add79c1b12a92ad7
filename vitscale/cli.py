"""`vitscale` command line: one sub-command per component, each in its own module.

A sub-command module provides `add_arguments(parser)` and `run(args) -> int`; it is imported only
when used, so `vitscale shards check` never pays for DeepSpeed's import.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vitscale.errors import VitscaleError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vitscale.train", "train a ViT (single process, torchrun or the deepspeed launcher)"),
    "config": ("vitscale.config_cli", "show, check or explain (document) the resolved config tree"),
    "model": ("vitscale.model.cli", "parameter counts and FLOPs of a model config"),
    "plan": ("vitscale.plan.cli", "will a run fit and how fast: memory per rank, img/s, cores, checkpoints, traffic"),
    "demo": ("vitscale.demo", "train a tiny ViT on a small real dataset on CPU (the README's demo)"),
    "shards": ("vitscale.data.cli", "write and check WebDataset shards"),
    "bench": ("vitscale.bench.cli", "benchmarks: attention, train step, data pipeline"),
    "checkpoint": ("vitscale.engine.checkpoint_cli", "verify a checkpoint's files against its checksum manifests"),
    "export": ("vitscale.interop.export", "export a checkpoint's fp32 weights + config to safetensors"),
    "eval": ("vitscale.evaluation.cli", "few-shot and top-1 evaluation of a checkpoint"),
    "convert": ("vitscale.interop.cli", "convert timm / Hugging Face / big_vision .npz weights"),
    "report": ("vitscale.metrics.report", "render a run's loss/lr/throughput/MFU curves to PNG"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vitscale", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            if name == "train":
                from vitscale.signals import install_early

                install_early()  # before the heavy imports (vitscale/signals.py)
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills `weights KEY=VALUE...` positionals in one go, so overrides written after
        # options (`vitscale eval top1 W --shards S model.x=1`, `config explain --config F KEY`)
        # arrive here: keep them in order (a word that is no override is refused by the config).
        if hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except VitscaleError as error:
        print(f"vitscale {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
