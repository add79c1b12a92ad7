"""Shard lists, the `_info.json` index of per-shard sample counts, and reading raw samples.

A sample is the group of consecutive tar members sharing a key (WebDataset convention:
`dir/key.jpg` + `dir/key.cls` -> {"__key__": "dir/key", "jpg": bytes, "cls": bytes}).
Reading never raises on damaged data: problems come back as `ShardProblem` items so the caller
can count and skip them (tolerant mode) or stop (strict mode), naming shard and key.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import webdataset
from webdataset.tariterators import base_plus_ext

from vitscale.errors import ConfigError, DataError

INDEX_NAME = "_info.json"


@dataclass(frozen=True)
class ShardProblem:
    """A sample (or a whole shard) that could not be read."""

    shard: str
    key: str  # "" when the problem concerns the whole shard
    reason: str  # missing_shard | truncated_shard | truncated_member
    detail: str


# ---------------------------------------------------------------------------------------------
# Shard lists.


def expand_shards(spec: str, *, allow_shell: bool, key: str = "data.train_shards") -> list[str]:
    """Brace pattern(s), a directory of .tar files, or a manifest (.txt) -> ordered shard URLs."""
    spec = spec.strip()
    if not spec:
        raise ConfigError(key, "no shards given", "set it to a brace pattern, a directory or a .txt manifest")
    urls: list[str] = []
    for part in spec.split(","):
        urls.extend(_expand_one(part.strip(), key))
    if not urls:
        raise DataError(f"{key}={spec!r} matches no shards (check the path or pattern)")
    if any(u.startswith("pipe:") for u in urls) and not allow_shell:
        raise ConfigError(key, "`pipe:` URLs run shell commands", "set data.allow_shell=true if you trust this config")
    return urls


def _expand_one(part: str, key: str) -> list[str]:
    if part.startswith("pipe:"):
        return list(braceexpand.braceexpand(part))
    path = Path(part)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise DataError(f"{key}: directory {path} holds no .tar shards (write some with `vitscale shards write`)")
        return found
    if path.suffix == ".txt" and path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        base = path.parent
        return [line if line.startswith("pipe:") or os.path.isabs(line) else str(base / line)
                for line in lines if line and not line.startswith("#")]
    return list(braceexpand.braceexpand(part))


# ---------------------------------------------------------------------------------------------
# The index: {"shards": {"name.tar": {"samples": n, "bytes": b}}, ...} next to the shards.


def index_path_for(urls: list[str], configured: str = "") -> Path | None:
    if configured:
        return Path(configured)
    first = urls[0]
    if first.startswith("pipe:"):
        return None
    return Path(first).parent / INDEX_NAME


def read_index(path: Path | None) -> dict[str, dict]:
    """Shard basename -> entry; {} when there is no index."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return dict(data["shards"])
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"index {path} is malformed ({error}); rewrite it with `vitscale shards check`") from None


def write_index(path: Path, entries: dict[str, dict], extra: dict | None = None) -> Path:
    data = {"shards": entries, "total_samples": sum(e["samples"] for e in entries.values())}
    data.update(extra or {})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def shard_sample_counts(urls: list[str], configured_index: str = "") -> list[int]:
    """Samples per shard: from the index, else by walking local tar headers (no decoding).

    A shard missing from disk counts 0 (the reader reports it as missing when it comes up).
    """
    indexes: dict[Path | None, dict[str, dict]] = {}
    counts = []
    for url in urls:
        # One index per shard directory (shards may come from several), unless one is configured.
        where = index_path_for([url], configured_index)
        if where not in indexes:
            indexes[where] = read_index(where)
        entry = indexes[where].get(shard_name(url))
        if entry is not None:
            counts.append(int(entry["samples"]))
        elif url.startswith("pipe:"):
            raise DataError(f"no sample count for {url}: write an index with "
                            f"`vitscale shards check` and set data.index to it")
        else:
            counts.append(count_samples(url))
    return counts


def shard_name(url: str) -> str:
    return os.path.basename(url.rstrip("|").split()[-1]) if url.startswith("pipe:") else os.path.basename(url)


def count_samples(path: str) -> int:
    """Number of distinct consecutive keys in a local tar, reading headers only."""
    if not os.path.exists(path):
        return 0
    count, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:  # seekable: skips member data
            for info in tar:
                key, _ = _split_name(info)
                if key is not None and key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass  # counted up to the damage; the reader reports the rest
    return count


# ---------------------------------------------------------------------------------------------
# Reading.


def _split_name(info: tarfile.TarInfo) -> tuple[str | None, str | None]:
    if not info.isfile() or "/." in "/" + info.name:
        return None, None
    return base_plus_ext(info.name)


def iter_shard(url: str) -> Iterator[dict | ShardProblem]:
    """Yield the samples of one shard in order, or ShardProblems for what cannot be read."""
    try:
        stream = webdataset.gopen(url, "rb") if url.startswith("pipe:") else open(url, "rb")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        yield ShardProblem(url, "", "missing_shard", str(error))
        return
    sample: dict | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                key, ext = _split_name(info)
                if key is None:
                    continue
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, OSError, EOFError) as error:
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                    yield ShardProblem(url, key, "truncated_member", f"{info.name}: {error}")
                    return
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__shard__": url}
                sample[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError) as error:
        # Damage between members (or an empty / non-tar file): what was read stays valid.
        if sample is not None:
            yield sample
            sample = None
        yield ShardProblem(url, "", "truncated_shard", str(error))
    if sample is not None:
        yield sample
