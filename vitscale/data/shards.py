"""Shard lists, the `_info.json` index of per-shard sample counts, and reading raw samples.

A sample is the group of consecutive tar members sharing a key (WebDataset convention:
`dir/key.jpg` + `dir/key.cls` -> {"__key__": "dir/key", "jpg": bytes, "cls": bytes}).
Reading never raises on damaged data: problems come back as `ShardProblem` items so the caller
can count and skip them (tolerant mode) or stop (strict mode), naming shard and key.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import webdataset
from webdataset.tariterators import base_plus_ext

from vitscale.errors import ConfigError, DataError

INDEX_NAME = "_info.json"
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
GZIP_MAGIC = b"\x1f\x8b"
NUL_BLOCK = bytes(tarfile.BLOCKSIZE)
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members: not samples


@dataclass(frozen=True)
class ShardProblem:
    """A sample (or a whole shard) that could not be read."""

    shard: str
    key: str  # "" when the problem concerns the whole shard
    reason: str  # missing_shard | truncated_shard | not_a_tar | empty_shard | truncated_member | ...
    detail: str
    slot: bool = True  # stands for one sample slot (False: a note about members that are no sample)


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
        found = sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_EXTENSIONS))
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


@dataclass
class ShardCounts:
    """Samples per shard, and what counting found wrong with shards that have no index entry
    (or a stale one): reported once by the loader, never silently zero."""

    counts: list[int]
    problems: list[ShardProblem]


def shard_sample_counts(urls: list[str], configured_index: str = "", *, threads: int = 32) -> ShardCounts:
    """Samples per shard: from the index, else by walking local tar headers (no decoding).

    An index entry whose recorded size differs from the file's is checked by counting: more
    samples than the index says means a stale index (the count is used: a stale count would drop
    samples); fewer means damage (the index's count is kept, so each lost sample is reported). The file-status calls run in parallel
    (one per shard: latency-bound on a network filesystem). A shard missing from disk counts 0
    (the reader reports it as missing when it comes up).
    """
    indexes: dict[Path | None, dict[str, dict]] = {}
    entries = []
    for url in urls:
        # One index per shard directory (shards may come from several), unless one is configured.
        where = index_path_for([url], configured_index)
        if where not in indexes:
            indexes[where] = read_index(where)
        entries.append(indexes[where].get(shard_name(url)))
    local = [i for i, url in enumerate(urls) if not url.startswith("pipe:")]
    with ThreadPoolExecutor(max(1, min(threads, len(local)))) as pool:
        sizes = dict(zip(local, pool.map(_file_size, [urls[i] for i in local])))
    counts, problems = [], []
    for i, (url, entry) in enumerate(zip(urls, entries)):
        size = sizes.get(i)
        recorded = None if entry is None else entry.get("bytes")
        if entry is not None and (size is None or recorded is None or size == recorded or url.startswith("pipe:")):
            counts.append(int(entry["samples"]))
            continue
        if url.startswith("pipe:"):
            raise DataError(f"no sample count for {url}: write an index with "
                            f"`vitscale shards check` and set data.index to it")
        counted = count_samples(url)
        if entry is not None and counted.samples <= int(entry["samples"]):
            # Smaller or cut: keep the index's count, so the reader reports each lost sample.
            counts.append(int(entry["samples"]))
            continue
        counts.append(counted.samples)
        if entry is not None:
            problems.append(ShardProblem(url, "", "stale_index", f"index says {entry['samples']} samples and "
                                         f"{recorded} bytes, the file has {size} bytes and {counted.samples} "
                                         f"samples; counted anew (rewrite the index with `vitscale shards check`)"))
        if counted.problem is not None:
            problems.append(counted.problem)
    return ShardCounts(counts, problems)


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def shard_name(url: str) -> str:
    """The index key of a shard: its file name (for `pipe:` commands, the token that names it)."""
    if not url.startswith("pipe:"):
        return os.path.basename(url)
    tokens = url[len("pipe:"):].replace("|", " ").split()
    named = [t for t in tokens if any(t.endswith(ext) for ext in SHARD_EXTENSIONS)]
    return os.path.basename((named or tokens or [url])[-1])


@dataclass(frozen=True)
class Counted:
    samples: int
    problem: ShardProblem | None = None


def count_samples(path: str) -> Counted:
    """Distinct consecutive keys of a local tar (headers only) and the damage found on the way:
    not a tar, empty, truncated (also on a 512-byte boundary: no end-of-archive block)."""
    if not os.path.exists(path):
        return Counted(0)
    if _is_compressed(path):  # no seeking in a compressed stream: read it through once
        samples, problem = 0, None
        for item in iter_shard(path):
            if isinstance(item, ShardProblem) and not item.slot:
                continue
            if isinstance(item, ShardProblem) and not item.key:
                problem = item
            else:
                samples += 1
        return Counted(samples, problem)
    count, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:  # seekable: skips member data
            for info in tar:
                key, _ = member_key(info)
                if key is not None and key != last:
                    count, last = count + 1, key
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as error:
        return Counted(count, _whole_shard_problem(path, count, error))
    with open(path, "rb") as handle:
        handle.seek(end)
        if handle.read(tarfile.BLOCKSIZE) != NUL_BLOCK:
            return Counted(count, ShardProblem(path, "", "truncated_shard", f"no end-of-archive block after "
                                               f"{count} samples: the file was cut short"))
    return Counted(count)


def _whole_shard_problem(url: str, samples_read: int, error: BaseException) -> ShardProblem:
    if samples_read == 0 and _file_size(url) == 0:
        return ShardProblem(url, "", "empty_shard", "0 bytes")
    if samples_read == 0:
        return ShardProblem(url, "", "not_a_tar", f"{type(error).__name__}: {error}")
    return ShardProblem(url, "", "truncated_shard", f"after {samples_read} samples: {error}")


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


# ---------------------------------------------------------------------------------------------
# Reading.


def member_key(info: tarfile.TarInfo) -> tuple[str | None, str | None]:
    """(key, extension) as WebDataset reads the member; (None, None) for what is not a sample
    file: directories, links, hidden files and meta files."""
    if not info.isfile() or unsafe_member(info):
        return None, None
    name = info.name
    while name.startswith("./"):  # `tar -C src -cf x.tar .` writes ./name
        name = name[2:]
    if "/." in "/" + name or META_MEMBER.match(name):
        return None, None
    key, ext = base_plus_ext(info.name)
    return (None, None) if key is None or ext is None else (key, ext)


def unsafe_member(info: tarfile.TarInfo) -> bool:
    """A member that climbs out of the archive (../x or /x): never read, but reported."""
    return info.name.startswith("/") or ".." in info.name.split("/")


class _CountingReader:
    """A stream that remembers how far it was read and its last bytes, so the reader can check
    that a tar ended with its end-of-archive block (a cut on a 512-byte boundary looks like a
    clean end to tarfile's stream mode)."""

    def __init__(self, stream, head: bytes = b""):
        self.stream, self.head, self.position, self.tail = stream, head, 0, b""

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data, self.head = self.head[:size] if size >= 0 else self.head, self.head[size:] if size >= 0 else b""
            if size < 0 or len(data) < size:
                data += self.stream.read(-1 if size < 0 else size - len(data))
        else:
            data = self.stream.read(size)
        self.position += len(data)
        self.tail = (self.tail + data)[-4 * tarfile.RECORDSIZE:]
        return data

    def bytes_at(self, offset: int, size: int) -> bytes | None:
        """Bytes [offset, offset + size) if they are among the last ones read."""
        start = self.position - len(self.tail)
        if offset < start:
            return None
        return self.tail[offset - start:offset - start + size]


def _open_stream(url: str):
    raw = webdataset.gopen(url, "rb") if url.startswith("pipe:") else open(url, "rb")
    head = raw.read(2)
    if head == GZIP_MAGIC:
        return raw, _CountingReader(gzip.GzipFile(fileobj=_CountingReader(raw, head), mode="rb"))
    return raw, _CountingReader(raw, head)


def iter_shard(url: str) -> Iterator[dict | ShardProblem]:
    """Yield the samples of one shard in order, or ShardProblems for what cannot be read.

    Every sample slot (a group of consecutive members with one key) yields exactly one item, a
    sample or a problem with its key, so slots line up with `count_samples`; problems without a
    key concern the whole shard and end it. Plain and gzip-compressed (`.tar.gz`) tars are read.
    """
    try:
        raw, stream = _open_stream(url)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        yield ShardProblem(url, "", "missing_shard", str(error))
        return
    sample: dict | None = None
    duplicate: str | None = None
    samples_read = 0

    def finished(item):
        nonlocal samples_read
        samples_read += 1
        if duplicate is not None and isinstance(item, dict):
            return ShardProblem(url, item["__key__"], "duplicate_key", f"member {duplicate} appears twice in a row "
                                                                       f"(two samples with one key?)")
        return item

    try:
        with raw, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if unsafe_member(info):
                    yield ShardProblem(url, "", "unsafe_member", f"{info.name}: outside the archive; not read",
                                       slot=False)
                    continue
                key, ext = member_key(info)
                if key is None:
                    continue
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, OSError, EOFError) as error:
                    if sample is not None and sample["__key__"] != key:
                        yield finished(sample)
                    yield ShardProblem(url, key, "truncated_member", f"{info.name}: {error}")
                    return
                if sample is not None and sample["__key__"] != key:
                    yield finished(sample)
                    sample, duplicate = None, None
                if sample is None:
                    sample = {"__key__": key, "__shard__": url}
                ext = ext.lower()
                if ext in sample:
                    duplicate = info.name
                sample[ext] = data
            end = tar.offset
        if stream.bytes_at(end, tarfile.BLOCKSIZE) != NUL_BLOCK:
            if sample is not None:
                yield finished(sample)
                sample = None
            yield ShardProblem(url, "", "truncated_shard", f"no end-of-archive block after {samples_read} samples: "
                                                           f"the file was cut short")
            return
    except (tarfile.TarError, OSError, EOFError) as error:
        # Damage between members (or an empty / non-tar file): what was read stays valid.
        if sample is not None:
            yield finished(sample)
            sample = None
        yield _whole_shard_problem(url, samples_read, error)
    if sample is not None:
        yield finished(sample)
