"""`vitscale eval`: evaluate exported weights or a training checkpoint.

    vitscale eval top1 runs/b16/checkpoints/step_00010000 --shards "/data/val-{0000..0063}.tar"
    vitscale eval fewshot b16.safetensors --train-shards "/data/train-{0000..1023}.tar" \
        --test-shards "/data/val-{0000..0063}.tar" --num-classes 1000 --shots 1 5 10 25

WEIGHTS is a `.safetensors` file from `vitscale export` / `vitscale convert`, a checkpoint
directory, a run directory (its latest complete checkpoint), or public weights that
`vitscale convert` reads (timm .safetensors, a Hugging Face directory, a Google .npz). Data settings (normalisation,
workers, ...) come from the config stored with the weights; `KEY=VALUE` overrides change them
(e.g. data.num_workers=2). Shards default to the stored config's data.eval_shards (and
data.train_shards for the few-shot training images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vitscale.errors import CheckpointError, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    top1 = tasks.add_parser("top1", help="top-1 accuracy of the classifier on held-out shards")
    _common(top1)
    top1.add_argument("--shards", help="held-out shards (default: the stored data.eval_shards)")
    top1.add_argument("--max-batches", type=int, help="stop after this many batches")
    fewshot = tasks.add_parser("fewshot", help="few-shot linear evaluation of the frozen representation")
    _common(fewshot)
    fewshot.add_argument("--train-shards", help="shards the k images per class come from (default: data.train_shards)")
    fewshot.add_argument("--test-shards", help="held-out shards to score (default: data.eval_shards)")
    fewshot.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25], help="k images per class")
    fewshot.add_argument("--num-classes", type=int, help="classes of the few-shot dataset (default: the model's)")
    fewshot.add_argument("--protocol", choices=("big_vision", "loo"), default="big_vision",
                         help="big_vision: random k per class, l2 1024, mean of --seeds seeds (default); "
                              "loo: first k per class, l2 by leave-one-out")
    fewshot.add_argument("--seeds", type=int, default=3, help="seeds averaged under big_vision (3)")
    fewshot.add_argument("--max-train-images-per-class", type=int, default=None,
                         help="big_vision: images per class the k are drawn from (default: every one read)")
    fewshot.add_argument("--l2-reg", type=float, help="ridge coefficient (default: 1024, or leave-one-out for loo)")
    fewshot.add_argument("--max-test-images", type=int, help="score at most this many held-out images")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="weights .safetensors, a checkpoint directory or a run directory")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="also write the results to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.num_workers=0")


def run(args: argparse.Namespace) -> int:
    model, config = load_for_eval(args.weights, args.overrides, args.device)
    if args.task == "top1":
        results = run_top1(model, config, args)
    else:
        results = run_fewshot(model, config, args)
    for name, value in results.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def load_for_eval(weights: str, overrides, device: str):
    """The model (eval mode, on `device`) and its config with the overrides applied."""
    from vitscale.config import apply_override, config_from_dict
    from vitscale.model import build_model
    from vitscale.research.finetune import load_pretrained

    if _is_foreign(Path(weights)):  # timm / Hugging Face / .npz: converted on the fly
        from vitscale.interop.cli import import_weights

        state_dict, config = import_weights(weights, overrides=overrides)
    else:
        state_dict, config = load_pretrained(weights)
        if overrides:
            raw = config.to_dict()
            for item in overrides:
                apply_override(raw, item)
            config = config_from_dict(raw).validate()
    model = build_model(config.model)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"{weights} does not fit its model config ({str(error).splitlines()[0]}); "
                              "do not override model.* structure fields") from None
    return model.to(device).eval(), config


def _is_foreign(path: Path) -> bool:
    if path.suffix == ".npz" or (path.is_dir() and (path / "config.json").is_file()):
        return True
    if path.suffix == ".safetensors" and path.is_file():
        from vitscale.model.weights import META_CONFIG, read_safetensors_header

        return META_CONFIG not in read_safetensors_header(path)[1]
    return False


def run_top1(model, config, args) -> dict:
    from vitscale.data import build_eval_loader
    from vitscale.evaluation.top1 import evaluate_top1

    if config.model.num_classes == 0:
        raise CheckpointError(f"{args.weights} has no classification head; use `vitscale eval fewshot`")
    shards = args.shards or config.data.eval_shards
    if not shards:
        raise ConfigError("data.eval_shards", "no held-out shards given", "pass --shards PATTERN")
    data = _replace(config.data, eval_shards=shards)
    loader = build_eval_loader(data, micro_batch_size=args.batch_size, image_size=config.model.image_size,
                               num_classes=config.model.num_classes, rank=0, world_size=1)
    return evaluate_top1(model, loader, device=args.device, max_batches=args.max_batches)


def run_fewshot(model, config, args) -> dict:
    from vitscale.evaluation.fewshot import FewShotEvaluator

    train_shards = args.train_shards or config.data.train_shards
    test_shards = args.test_shards or config.data.eval_shards
    if not train_shards or not test_shards:
        raise ConfigError("data.train_shards" if not train_shards else "data.eval_shards", "no shards given",
                          "pass --train-shards and --test-shards")
    num_classes = args.num_classes or config.model.num_classes
    if not num_classes:
        raise ConfigError("model.num_classes", "the model is headless, so the few-shot class count is unknown",
                          "pass --num-classes K")
    evaluator = FewShotEvaluator(config.data, train_shards=train_shards, test_shards=test_shards,
                                 image_size=config.model.image_size, num_classes=num_classes, shots=args.shots,
                                 micro_batch_size=args.batch_size, max_test_images=args.max_test_images,
                                 l2_reg=args.l2_reg, protocol=args.protocol, seeds=args.seeds,
                                 max_train_images_per_class=args.max_train_images_per_class)
    return evaluator.evaluate(model, device=args.device)


def _replace(data, **changes):
    import dataclasses

    return dataclasses.replace(data, **changes)
