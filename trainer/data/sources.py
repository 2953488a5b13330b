"""Training sources: what `DataConfig.train` names, resolved to a list of shards with sample counts.

Sources (`DataConfig.train`): a shard folder with manifest.json; a glob / brace list of .tar files (counts from a
manifest beside them, else one read each, cached in work_dir/shard_counts.json); webdataset URLs (`pipe:...`,
http(s), ...; brace-expanded and opened by webdataset's `expand_urls` / `gopen`), or one URL naming a
manifest.json, whose shard URLs are the same URL with the shard's name. A text / .gz / jsonl corpus is not a
stream source: `trainer.data.prepare.prepare_train_source` shards it once into work_dir/shards before the
stream is built, and the stream reads that folder. Tar parsing is our own streaming reader
(trainer.data.shard_format): it skips samples without decoding them and reports truncation, which the exact
split and the bad-shard policy need.

Bad shards (`on_error`): missing, empty or truncated (size differs from manifest.json, or the counting read
finds the archive cut short) shards are found here, when the stream is built, and under `data.verify: sha256`
shards whose bytes differ from the manifest's checksum (trainer.data.verify); `raise` stops with a UserError
naming the shard, `skip` logs, records it as a {"shard", "reason"} record and leaves it out. Shards that fail
only while being read are the stream's affair.

Shard names from a manifest are plain file names (checked by `parse_manifest`) and are shell-quoted where
they complete a `pipe:` URL, so a manifest can never run a command.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

from trainer.data.shard_format import (
    MANIFEST,
    ShardError,
    count_samples,
    is_url,
    open_shard,
    parse_manifest,
    read_manifest,
)
from trainer.data.verify import check_sha256
from trainer.errors import UserError

log = logging.getLogger(__name__)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Version of the tar reader whose counts work_dir/shard_counts.json holds: counts made by a reader that let
# truncated shards through (before 2) are not trusted.
_COUNTS_VERSION = 2


@dataclass(frozen=True)
class Shard:
    """One readable shard: what `open_shard` opens, a name for messages, and its sample count."""

    url: str
    name: str
    num_samples: int
    sha256: Optional[str] = None
    """The checksum a manifest lists for it (verified under `data.verify: sha256`)."""
    origin: str = MANIFEST
    """Where `num_samples` comes from, for messages: manifest.json, or shard_counts.json (a counting read)."""


@dataclass(frozen=True)
class Source:
    """What a `data.train` spec names once its braces and globs are expanded."""

    kind: Literal["urls", "manifest_url", "manifest", "tars", "corpus"]
    """`urls`: webdataset URLs; `manifest_url`: one URL naming a manifest.json; `manifest`: a folder holding
    manifest.json; `tars`: local .tar files; `corpus`: text / .gz / jsonl files, to be sharded before reading."""
    items: tuple[str, ...]
    """The URLs, the manifest folder, the .tar paths or the corpus files."""


# ----------------------------------------------------------------------------------------------------------
# Spec parsing


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named by paths and glob patterns, in the given order (each glob sorted); UserError for a missing
    file, a glob matching nothing or a directory."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        if any(c in text for c in "*?["):
            matches = sorted(p for p in globlib.glob(text, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"input pattern matches no file: {text}")
            files.extend(Path(p) for p in matches)
        elif os.path.isdir(text):
            raise UserError(f"input is a directory: {text} (pass a glob such as {os.path.join(text, '*.txt')})")
        elif not os.path.isfile(text):
            raise UserError(f"input file not found: {text}")
        else:
            files.append(Path(text))
    if not files:
        raise UserError("no input files given")
    return files


def parse_source(spec: str) -> Source:
    """Classify `spec` (see `DataConfig.train`); UserError for an empty or mixed spec, a glob matching nothing,
    a folder without shards or a missing corpus file."""
    import webdataset as wds

    spec = spec.strip()
    if not spec:
        raise UserError("data.train is empty: set it to a shard folder, .tar pattern, URL or text file")
    items = wds.shardlists.expand_urls(spec)
    if any(is_url(i) for i in items):
        if not all(is_url(i) for i in items):
            raise UserError(f"data.train mixes URLs and local paths: {spec}")
        if len(items) == 1 and "manifest.json" in items[0]:
            return Source("manifest_url", (items[0],))
        return Source("urls", tuple(items))
    paths: list[str] = []
    for item in items:
        item = re.sub(r"^file://?", "/", item) if item.startswith("file:") else item
        if any(c in item for c in "*?["):
            paths.extend(str(p) for p in expand_inputs([item]))
        else:
            paths.append(item)
    if len(paths) == 1 and paths[0].endswith(MANIFEST):
        return Source("manifest", (str(Path(paths[0]).parent),))
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = Path(paths[0])
        if (folder / MANIFEST).is_file():
            return Source("manifest", (paths[0],))
        paths = sorted(str(p) for p in folder.glob("*.tar"))
        if not paths:
            raise UserError(f"data.train folder {folder} holds neither {MANIFEST} nor .tar shards")
    if all(p.endswith(_TAR_SUFFIXES) for p in paths):
        return Source("tars", tuple(paths))
    if any(p.endswith(_TAR_SUFFIXES) for p in paths):
        raise UserError(f"data.train mixes .tar shards and text files: {spec}")
    return Source("corpus", tuple(str(p) for p in expand_inputs(paths)))


@contextlib.contextmanager
def work_dir_lock(work_dir: Path) -> Iterator[None]:
    """Serialise on-the-fly sharding and counting between the ranks sharing `work_dir`."""
    import fcntl

    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fh = open(work_dir / ".data.lock", "a+")
    except OSError as exc:
        raise UserError(f"cannot use {work_dir} for shards and shard counts: {exc.strerror or exc}") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------
# Resolution and counting


class _Resolver:
    """Turns `data.train` into a list of `Shard`s with sample counts, applying the bad-shard policy."""

    def __init__(self, on_error: str, work_dir: Path, verify: str = "size"):
        self.on_error = on_error
        self.work_dir = work_dir
        self.verify = verify
        self.skipped: list[dict] = []
        self.shards: list[Shard] = []
        self.unverified = 0  # shards without a listed sha256 under verify=sha256

    def reject(self, name: str, reason: str) -> None:
        if self.on_error == "raise":
            raise ShardError(name, reason)
        log.warning("skipping shard %s: %s", name, reason)
        self.skipped.append({"shard": name, "reason": reason})

    def add(self, url: str, name: str, count: int, sha256: Optional[str] = None, origin: str = MANIFEST) -> None:
        if count == 0:
            return self.reject(name, "empty (no samples with a txt field)")
        if self.verify == "sha256":
            if sha256 is None:
                self.unverified += 1
            else:
                reason = check_sha256(url, sha256)
                if reason is not None:
                    return self.reject(name, reason)
        self.shards.append(Shard(url, name, count, sha256, origin))

    def resolve(self, spec: str) -> list[Shard]:
        source = parse_source(spec)
        if source.kind == "corpus":
            # Building shards is a write with its own locking and progress: it happens before the stream.
            raise UserError(
                f"data.train={spec!r} is a text corpus, which the training stream does not shard: build shards "
                "first (`python -m trainer shard`, or `trainer.data.prepare_train_source`, which `train` calls)"
            )
        if source.kind == "manifest_url":
            self._from_manifest_url(source.items[0])
        elif source.kind == "urls":
            self._from_urls(list(source.items))
        elif source.kind == "manifest":
            self._from_manifest(Path(source.items[0]))
        else:
            self._from_local_tars(list(source.items))
        return self.shards

    def _from_manifest(self, folder: Path) -> None:
        manifest = read_manifest(folder)
        for entry in manifest["shards"]:
            path = folder / entry["name"]
            try:
                size = path.stat().st_size
            except OSError:
                self.reject(str(path), "missing (listed in manifest.json)")
                continue
            if "bytes" in entry and size != entry["bytes"]:
                self.reject(str(path), f"corrupt or truncated: {size} bytes, manifest.json says {entry['bytes']}")
                continue
            self.add(str(path), str(path), int(entry["num_samples"]), entry.get("sha256"))

    def _from_manifest_url(self, url: str) -> None:
        try:
            with contextlib.closing(open_shard(url)) as stream:
                manifest = parse_manifest(stream.read().decode("utf-8"), url)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read manifest {url}: {exc}") from None
        head, _, tail = url.rpartition("manifest.json")
        # Names are plain file names (parse_manifest); quoting them too keeps a shell out of reach for good.
        quote = shlex.quote if url.startswith("pipe:") else str
        for entry in manifest["shards"]:
            shard_url = head + quote(entry["name"]) + tail  # same command/host, the shard's name for the manifest's
            self.add(shard_url, shard_url, int(entry["num_samples"]), entry.get("sha256"))

    def _count(self, items: list[tuple[str, str, str]]) -> dict[str, int | str]:
        """{cache key: sample count or failure reason} for (url, name, cache key) items, one read of each
        shard not yet in work_dir/shard_counts.json."""
        cache_file = self.work_dir / "shard_counts.json"
        with work_dir_lock(self.work_dir):
            try:
                stored = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                stored = {}
            cache = stored.get("counts", {}) if stored.get("reader") == _COUNTS_VERSION else {}
            fresh = [i for i in items if i[2] not in cache]
            if fresh:
                log.info("counting samples in %d shards (one read each; a manifest.json avoids this)", len(fresh))
                for url, name, key in fresh:
                    try:
                        cache[key] = count_samples(url, name)
                    except ShardError as exc:
                        cache[key] = exc.reason
                tmp = cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"reader": _COUNTS_VERSION, "counts": cache}, indent=1))
                os.replace(tmp, cache_file)
        return cache

    def _add_counted(self, url: str, name: str, count: int | str, entry: Optional[dict] = None) -> None:
        if isinstance(count, str):
            self.reject(name, count)
        elif entry is not None:
            self.add(url, name, count, entry.get("sha256"))
        else:
            self.add(url, name, count, origin="shard_counts.json")

    def _from_urls(self, urls: list[str]) -> None:
        counts = self._count([(u, u, u) for u in urls])
        for url in urls:
            self._add_counted(url, url, counts[url])

    def _from_local_tars(self, paths: list[str]) -> None:
        # Counts come from a manifest.json beside the shards when it lists them at the same size; otherwise
        # each shard is read once and its count cached by path, size and mtime.
        listed: dict[str, dict] = {}
        for folder in {os.path.dirname(os.path.abspath(p)) for p in paths}:
            with contextlib.suppress(UserError):
                for entry in read_manifest(folder)["shards"]:
                    listed[os.path.join(folder, entry["name"])] = entry
        known: dict[str, int | str] = {}
        listed_ok: set[str] = set()  # counts (and checksums) from the manifest
        todo: list[tuple[str, str, str]] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                known[path] = "missing"
                continue
            entry = listed.get(os.path.abspath(path))
            if entry is not None and entry.get("bytes") == st.st_size:
                known[path] = int(entry["num_samples"])
                listed_ok.add(path)
            else:
                todo.append((path, path, f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"))
        if todo:
            counts = self._count(todo)
            known.update({path: counts[key] for path, _, key in todo})
        for path in paths:
            entry = listed.get(os.path.abspath(path))
            self._add_counted(path, path, known[path], entry if path in listed_ok else None)


def resolve_shards(
    spec: str, *, work_dir: str | Path, on_error: str = "raise", verify: str = "size"
) -> tuple[list[Shard], list[dict]]:
    """Shards named by `spec` (see `DataConfig.train`) with sample counts, and the shards skipped under
    `on_error="skip"` as {"shard", "reason"} records. Counts not found in a manifest are cached in
    `work_dir/shard_counts.json`. `verify="sha256"` checks every shard a manifest lists a checksum for (see
    trainer.data.verify). A text corpus is a UserError: `prepare_train_source` shards it first."""
    resolver = _Resolver(on_error, Path(work_dir), verify)
    shards = resolver.resolve(spec)
    if resolver.unverified:
        log.warning("data.verify=sha256: %d shards have no sha256 in a manifest.json; only their size and tar "
                    "structure are checked", resolver.unverified)
    if not shards:
        raise UserError(f"no readable shards in data.train={spec!r} ({len(resolver.skipped)} skipped)")
    return shards, resolver.skipped
