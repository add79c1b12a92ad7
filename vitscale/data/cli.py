"""`vitscale shards`: write shards, check them, and plan how a job will read them.

    vitscale shards write IMAGE_FOLDER_OR_MANIFEST OUT_DIR --prefix train --max-count 1000 [--max-side 256]
    vitscale shards check 'OUT_DIR/train-{000000..000099}.tar' --num-classes 1000
    vitscale shards plan --config configs/vit_b16_i21k.yaml --world-size 512
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from vitscale.config import add_config_arguments, config_from_args
from vitscale.data.decode import LabelSpec, load_class_map
from vitscale.data.shard_tools import (SKIPPED_SOURCES, Resize, check_shards, describe_plan, size_summary,
                                      write_check_index, write_from_source)
from vitscale.data.shards import INDEX_NAME, index_path_for
from vitscale.errors import DataError


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    write = sub.add_parser("write", help="image folder (ROOT/CLASS/*.jpg) or CSV/JSONL manifest -> shards")
    write.add_argument("source", type=Path, help="folder with class sub-folders, or .csv/.jsonl (path,label)")
    write.add_argument("out_dir", type=Path)
    write.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar, ...")
    write.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    write.add_argument("--max-bytes", type=float, default=None, help="bytes per shard (rolls over before)")
    write.add_argument("--multi-label", action="store_true", help="write .json label lists instead of .cls")
    write.add_argument("--class-map", default="", help="names -> ids for manifests with class names")
    write.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    write.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                       help="keep the source order (default: shuffled, so shards mix classes)")
    write.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    write.add_argument("--max-side", type=int, default=None, metavar="N",
                       help="re-encode images whose shorter side exceeds N at a shorter side of N (antialiased; "
                            "original size kept in original_size.json): faster decoding, smaller shards")
    write.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    write.add_argument("--skip-bad", action="store_true",
                       help="leave out unreadable images and bad labels, listed in OUT_DIR/skipped_sources.jsonl "
                            "(default: stop at the first, naming it, and write nothing)")
    check = sub.add_parser("check", help="count samples, decode every image, validate labels, write _info.json")
    check.add_argument("shards", help="brace pattern, directory or .txt manifest")
    check.add_argument("--num-classes", type=int, default=None, help="also check class ids are < this")
    check.add_argument("--multi-label", action="store_true")
    check.add_argument("--class-map", default="")
    check.add_argument("--index", default="", help=f"where to write the index (default: {INDEX_NAME} beside)")
    check.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    check.add_argument("--allow-shell", action="store_true", help="allow pipe: URLs")
    check.add_argument("--max-side", type=int, default=256, metavar="N",
                       help="report what pre-resizing to a shorter side of N would save (default 256)")
    plan = sub.add_parser("plan", help="pre-flight: how ranks x workers will read the shards")
    add_config_arguments(plan)
    plan.add_argument("--world-size", type=int, required=True, help="number of ranks of the job")
    plan.add_argument("--split", choices=["train", "eval"], default="train")


def run(args) -> int:
    return {"write": run_write, "check": run_check, "plan": run_plan}[args.shards_command](args)


def run_write(args) -> int:
    if args.max_count <= 0:
        raise DataError("--max-count must be > 0")
    if args.max_side is not None and args.max_side < 1:
        raise DataError(f"--max-side must be a positive number of pixels, got {args.max_side}")
    if not 1 <= args.quality <= 100:
        raise DataError(f"--quality must be in 1..100 (JPEG quality), got {args.quality}")
    pattern, count, skipped = write_from_source(
        args.source, args.out_dir, prefix=args.prefix, max_count=args.max_count,
        max_bytes=int(args.max_bytes) if args.max_bytes else None, multi_label=args.multi_label,
        workers=args.workers, class_map=load_class_map(args.class_map), shuffle=args.shuffle, seed=args.seed,
        skip_bad=args.skip_bad, resize=Resize(args.max_side, args.quality) if args.max_side else None)
    order = f"shuffled with seed {args.seed}" if args.shuffle else "in source order"
    print(f"wrote {count} samples {order} to {pattern} (index: {args.out_dir / INDEX_NAME})")
    if skipped:
        print(f"left out {len(skipped)} bad source files, listed in {args.out_dir / SKIPPED_SOURCES}, e.g. "
              f"{skipped[0].line()}")
    return 0


def run_check(args) -> int:
    labels = None
    if args.num_classes is not None:
        labels = LabelSpec(args.num_classes, args.multi_label, load_class_map(args.class_map))
    reports = check_shards(args.shards, labels=labels, workers=args.workers, allow_shell=args.allow_shell)
    urls = [r.url for r in reports]
    index, stale = write_check_index(reports, index_path_for(urls, args.index) or Path(INDEX_NAME))
    for line in stale:
        print(f"stale index entry: {line}")
    problems = [(r.url, key, reason, detail) for r in reports for key, reason, detail in r.problems]
    for url, key, reason, detail in problems:
        print(f"{url}: {key or '(shard)'}: {reason}: {detail}")
    by_reason = collections.Counter(p[2] for p in problems)
    total = sum(r.samples for r in reports)
    for line in size_summary(reports, args.max_side):
        print(line)
    print(f"{len(reports)} shards, {total} samples, {len(problems)} problems"
          + (f" ({json.dumps(dict(by_reason))})" if problems else "") + f"; index written to {index}")
    return 1 if problems else 0


def run_plan(args) -> int:
    config = config_from_args(args)
    data = config.data
    spec = data.train_shards if args.split == "train" else data.eval_shards
    plan = describe_plan(spec, index=data.index, world_size=args.world_size, workers=data.num_workers,
                         micro_batch=config.engine.micro_batch_size, allow_shell=data.allow_shell,
                         few_shards=data.few_shards, key=f"data.{args.split}_shards")
    for key, value in plan.items():
        print(f"{key}: {value}")
    if plan["shared_shards"]:
        print(f"rebalanced: {plan['shards']} shards < {plan['readers']} readers, so readers split shards at "
              f"sample level (each reads only its own samples but may skip over others'); for full streaming "
              f"speed write at least {plan['readers']} shards")
    return 0
