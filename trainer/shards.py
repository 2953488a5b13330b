"""Corpus -> webdataset shards, and the shard format itself (writer, fast reader, manifest).

`python -m trainer shard --input FILE_OR_GLOB [--input ...] --output DIR` reads plain text (one sentence a line),
gzip text and JSON lines (`--field`, default "text"), cleans every line (strip; skip empty, invalid UTF-8, too
short/long, duplicate with `--dedup`, bad JSON) and writes

    DIR/shard-000000.tar, shard-000001.tar, ...   `shard_size` samples each (the last may hold fewer)
    DIR/manifest.json                             shards (samples, bytes, sha256), totals, skip report, inputs

Each sample is one tar member `<key>.txt` (UTF-8 sentence); the key is the sample's global index, zero-padded
to 10 digits, so keys are unique within a build and stable across re-runs. Headers are plain ustar with
mtime/uid/gid 0, so the same input gives byte-identical shards (and checksums) for any number of workers:
the main process reads and filters lines in input order and cuts shards; workers only serialise and write.

Crash safety: the old manifest is removed first, each shard is written to a hidden temp name, fsynced and
`os.replace`d, the manifest is written last (atomically), and stale shards of an earlier, larger build are
deleted only after it. A folder without manifest.json is an incomplete build; re-running fixes it.
"""

from __future__ import annotations

import argparse
import glob as globlib
import gzip
import hashlib
import json
import logging
import os
import re
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional, Sequence

from trainer.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_MAX_CHARS = 5_000
SKIP_REASONS = ("empty", "invalid_utf8", "too_short", "too_long", "duplicate", "bad_json")
FORMAT_VERSION = 1

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_READ_BYTES = 4 << 20
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar record size: archives are padded to a multiple of it, as GNU tar does


class ShardError(UserError):
    """A shard that cannot be read: missing, truncated, corrupt or empty. `.shard` names it."""

    def __init__(self, shard: str, reason: str):
        super().__init__(f"shard {shard}: {reason}")
        self.shard = shard
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------
# Tar writer: precomputed ustar header (mtime/uid/gid 0 -> deterministic bytes), ~10x faster than `tarfile`.


def _header_template() -> tuple[bytearray, int]:
    h = bytearray(_BLOCK)
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8  # checksum is computed with its own field as spaces
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"  # POSIX ustar magic + version
    return h, sum(h)


_TEMPLATE, _TEMPLATE_SUM = _header_template()


def _member_header(name: bytes, size: int) -> bytes:
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size_field = b"%011o\0" % size
    h = _TEMPLATE[:]
    h[0 : len(name)] = name
    h[124:136] = size_field
    # Checksum = byte sum of the header with its own field as 8 spaces; the template's name and size fields
    # are zero bytes, so the template sum plus the two filled-in fields is exact.
    h[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(name) + sum(size_field))
    return bytes(h)


def tar_bytes(samples: Iterable[tuple[str, str]]) -> bytes:
    """A complete tar archive holding one `<key>.txt` member (UTF-8) per (key, text)."""
    parts: list[bytes] = []
    total = 0
    for key, text in samples:
        data = text.encode("utf-8")
        pad = -len(data) % _BLOCK
        parts += (_member_header(f"{key}.txt".encode("ascii"), len(data)), data, b"\0" * pad)
        total += _BLOCK + len(data) + pad
    total += 2 * _BLOCK  # end-of-archive marker: two zero blocks
    parts.append(b"\0" * (2 * _BLOCK + (-total % _RECORD)))
    return b"".join(parts)


def sample_key(index: int) -> str:
    """Key of the sample with global index `index` in a build."""
    return f"{index:010d}"


def _write_shard(output_dir: str, shard_index: int, first_index: int, texts: list[str]) -> dict:
    """Serialise one shard to a temp name, fsync, rename into place; return its manifest entry."""
    name = SHARD_NAME.format(shard_index)
    data = tar_bytes((sample_key(first_index + i), t) for i, t in enumerate(texts))
    tmp = os.path.join(output_dir, f".{name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(output_dir, name))
    return {"name": name, "num_samples": len(texts), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------------------------------------
# Tar reader: streaming, chunked, no seeks (works on pipes), strict about truncation.

_META_RE = re.compile(r"__[^/]*__($|/)")


# name, size, typeflag, magic, prefix: the ustar header fields a reader needs, in one C call per member
_HEADER = struct.Struct("100s24x12s20xc100x5s83x155s12x")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.strip(b" \0")
    return int(field, 8) if field else 0


def _cstr(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _tar_members(stream: IO[bytes], shard: str) -> Iterator[tuple[str, bytes]]:
    """(member name, data) of every regular file; raises ShardError on a truncated or corrupt archive."""
    buf = b""
    pos = 0
    eof = False
    long_name: Optional[str] = None
    pax_name: Optional[str] = None
    while True:
        end = pos + _BLOCK
        if end > len(buf) and not eof:
            buf, pos, eof = _refill(stream, buf, pos, _BLOCK)
            end = pos + _BLOCK
        if end > len(buf):
            if pos == len(buf):
                return  # archive without an end marker: tolerated, as tarfile does
            raise ShardError(shard, "truncated tar (partial header at end of file)")
        name_field, size_field, kind, magic, prefix = _HEADER.unpack_from(buf, pos)
        if magic != b"ustar":
            header = buf[pos:end]
            if header.count(0) == _BLOCK:
                return  # end-of-archive marker
            # Pre-POSIX archives have no magic; then the checksum is the only integrity check there is.
            try:
                ok = _octal(header[148:156]) == sum(header[:148]) + 8 * 32 + sum(header[156:])
            except ValueError:
                ok = False
            if not ok:
                raise ShardError(shard, "corrupt tar header (bad checksum)")
        try:
            size = _octal(size_field)
        except ValueError:
            raise ShardError(shard, "corrupt tar header (bad size field)") from None
        pos = end
        end = pos + size
        if end > len(buf) and not eof:
            buf, pos, eof = _refill(stream, buf, pos, size)
            end = pos + size
        if end > len(buf):
            raise ShardError(shard, f"truncated tar (member data ends after {len(buf) - pos} of {size} bytes)")
        data = buf[pos:end]
        pos = end + (-size % _BLOCK)
        if kind == b"0" or kind == b"\0" or kind == b"7":
            name = pax_name or long_name
            if name is None:
                name = name_field.partition(b"\0")[0].decode("utf-8", "surrogateescape")
                if magic == b"ustar" and prefix[0]:
                    name = _cstr(prefix) + "/" + name
            long_name = pax_name = None
            yield name, data
        elif kind == b"L":  # GNU long name for the next member
            long_name = _cstr(data)
        elif kind == b"x":  # pax extended header: records "LEN path=VALUE\n"
            for record in data.split(b"\n"):
                key, _, value = record.partition(b"=")
                if key.endswith(b" path"):
                    pax_name = value.decode("utf-8", "surrogateescape")
        else:
            long_name = pax_name = None  # directories, links, global pax headers


def _refill(stream: IO[bytes], buf: bytes, pos: int, need: int) -> tuple[bytes, int, bool]:
    """Drop consumed bytes and read until `need` bytes are buffered or the stream ends: (buf, 0, eof)."""
    parts, have = [buf[pos:]], len(buf) - pos
    eof = False
    while have < need:
        chunk = stream.read(max(1 << 20, need - have))
        if not chunk:
            eof = True
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts), 0, eof


def iter_tar_samples(stream: IO[bytes], shard: str) -> Iterator[tuple[str, bytes]]:
    """(key, txt bytes) of every sample (consecutive members sharing a key, webdataset's grouping) that has a
    `txt` member; samples without one are ignored, the same way when counting and when reading."""
    key: Optional[str] = None
    text: Optional[bytes] = None
    for name, data in _tar_members(stream, shard):
        # webdataset's split: key = path up to the first dot of the basename, extension = the rest
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot <= slash or (name.startswith("__", slash) and _META_RE.match(name[slash:])):
            continue
        member_key = name[:dot]
        if member_key != key:
            if text is not None:
                yield key, text  # type: ignore[misc]
            key, text = member_key, None
        if name[dot + 1 :].lower() == "txt":
            text = data
    if text is not None:
        yield key, text  # type: ignore[misc]


def open_shard(url: str) -> IO[bytes]:
    """Open a local path or a webdataset URL (`pipe:...`, http(s), `file:`) for reading; `.tar.gz`/`.tgz` are
    decompressed on the fly."""
    import webdataset as wds  # lazy: only readers need it

    stream = wds.gopen(url, "rb")
    if url.rstrip(" -").endswith((".tar.gz", ".tgz")):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    return stream


def count_samples(url: str, name: Optional[str] = None) -> int:
    """Samples in one shard (one full read); ShardError if it is unreadable."""
    name = name or url
    try:
        stream = open_shard(url)
    except OSError as exc:
        raise ShardError(name, f"cannot open ({exc})") from None
    try:
        count = sum(1 for _ in iter_tar_samples(stream, name))
    except (OSError, EOFError, zlib.error) as exc:
        raise ShardError(name, f"read error ({exc})") from None
    finally:
        try:
            stream.close()
        except OSError as exc:
            raise ShardError(name, f"read error ({exc})") from None
    return count


# ----------------------------------------------------------------------------------------------------------
# Manifest


def read_manifest(folder: str | Path) -> dict:
    """Load and sanity-check `<folder>/manifest.json`; UserError if it is missing or malformed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {folder} (build shards with `python -m trainer shard`)")
    return parse_manifest(path.read_text(encoding="utf-8"), str(path))


def parse_manifest(text: str, where: str) -> dict:
    """Parse manifest JSON text (from a file or a URL) and check its shape."""
    try:
        manifest = json.loads(text)
        shards = manifest["shards"]
        for entry in shards:
            if not isinstance(entry["name"], str) or int(entry["num_samples"]) < 0:
                raise ValueError(entry)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: not a valid shard manifest ({exc})") from None
    return manifest


def manifest_matches(folder: str | Path, inputs: Sequence[str | Path], **options: Any) -> bool:
    """True when `folder` holds a complete build of exactly these input files (same paths, sizes and mtimes)
    with these `build_shards` options (shard_size, field, dedup, min_chars, max_chars)."""
    try:
        manifest = read_manifest(folder)
    except UserError:
        return False
    return manifest.get("inputs") == [_input_record(Path(p)) for p in inputs] and manifest.get("options") == options


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Input reading and cleaning


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


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(_JSONL_SUFFIXES)


def _raw_blocks(path: Path) -> Iterator[tuple[list[bytes], int]]:
    """(complete raw lines, compressed bytes consumed so far) in blocks of ~4 MiB."""
    raw = open(path, "rb")
    try:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.lower().endswith(".gz") else raw
        rest = b""
        first = True
        while True:
            try:
                chunk = stream.read(_READ_BYTES)
            except (OSError, EOFError, zlib.error) as exc:
                raise UserError(f"{path}: cannot read ({exc})") from None
            if first:
                first = False
                if chunk.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                    chunk = chunk[3:]
            if not chunk:
                if rest:
                    yield [rest], raw.tell()
                return
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1 :]
            yield data[:cut].split(b"\n"), raw.tell()
    finally:
        raw.close()


class _Cleaner:
    """Turns raw lines into kept sentences, counting every skip by reason (first occurrence wins on dedup)."""

    def __init__(self, *, jsonl: bool, field: str, dedup: bool, min_chars: int, max_chars: int):
        self.jsonl, self.field, self.dedup = jsonl, field, dedup
        self.min_chars, self.max_chars = min_chars, max_chars
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.seen: set[bytes] = set()
        self.lines = 0

    def _decode(self, lines: list[bytes]) -> list[Optional[str]]:
        try:  # one decode call per block is ~10x faster than per line; fall back only if the block is bad
            return b"\n".join(lines).decode("utf-8").split("\n")  # type: ignore[return-value]
        except UnicodeDecodeError:
            out: list[Optional[str]] = []
            for line in lines:
                try:
                    out.append(line.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append(None)
            return out

    def clean(self, lines: list[bytes]) -> list[str]:
        self.lines += len(lines)
        skipped = self.skipped
        kept: list[str] = []
        for line in self._decode(lines):
            if line is None:
                skipped["invalid_utf8"] += 1
                continue
            if self.jsonl:
                if not line.strip():
                    skipped["empty"] += 1
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    skipped["bad_json"] += 1
                    continue
                line = obj.get(self.field) if isinstance(obj, dict) else None
                if not isinstance(line, str):
                    skipped["bad_json"] += 1
                    continue
            line = line.strip()
            n = len(line)
            if n == 0:
                skipped["empty"] += 1
            elif n < self.min_chars:
                skipped["too_short"] += 1
            elif n > self.max_chars:
                skipped["too_long"] += 1
            elif self.dedup:
                # 128-bit digests instead of the strings: ~50 bytes a line; deterministic, unlike hash().
                digest = hashlib.blake2b(line.encode("utf-8"), digest_size=16).digest()
                if digest in self.seen:
                    skipped["duplicate"] += 1
                else:
                    self.seen.add(digest)
                    kept.append(line)
            else:
                kept.append(line)
        return kept


# ----------------------------------------------------------------------------------------------------------
# Builder


def _prepare_output(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output {output_dir} exists and is not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output directory {output_dir}: {exc.strerror or exc}") from None
    # An old manifest would describe shards this run is about to overwrite: remove it first, so a crash
    # leaves a folder that reads as incomplete rather than one whose manifest lies.
    (output_dir / MANIFEST).unlink(missing_ok=True)
    for tmp in output_dir.glob(".shard-*.tar.tmp"):
        tmp.unlink(missing_ok=True)


def _input_record(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_shards(
    inputs: Sequence[str | Path] | str | Path,
    output_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    field: Optional[str] = None,
    workers: int = 1,
    dedup: bool = False,
    min_chars: int = 1,
    max_chars: int = DEFAULT_MAX_CHARS,
    progress: bool = True,
) -> dict:
    """Write webdataset shards + manifest.json for a text / .gz / jsonl corpus; return the manifest.

    `inputs`: paths and glob patterns, read in order. Files named `*.jsonl|ndjson|json[.gz]` (all files when
    `field` is given) are JSON lines whose `field` (default "text") is the sentence. `workers` > 1 adds that
    many writer processes (the reading and cutting stays in this process, so output does not depend on it).
    Lengths are in characters after stripping whitespace; `dedup` drops exact repeats across all inputs.
    """
    if shard_size < 1:
        raise UserError(f"shard size must be >= 1, got {shard_size}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if min_chars < 1 or max_chars < min_chars:
        raise UserError(f"need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    from tqdm.auto import tqdm

    files = expand_inputs(inputs if not isinstance(inputs, (str, Path)) else [inputs])
    output_dir = Path(output_dir)
    _prepare_output(output_dir)
    records = [_input_record(p) for p in files]
    options = {"shard_size": shard_size, "field": field, "dedup": dedup, "min_chars": min_chars, "max_chars": max_chars}

    pool = None
    if workers > 1:
        # fork: the writer is pure Python I/O, and spawn cannot re-import a __main__ read from stdin/notebooks.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=get_context(method))
    pending: deque[Future] = deque()
    entries: list[dict] = []
    buffer: list[str] = []
    num_samples = 0
    cleaners = []
    bar = tqdm(total=sum(r["bytes"] for r in records), unit="B", unit_scale=True, desc="shard",
               disable=None if progress else True, dynamic_ncols=True)

    def flush(texts: list[str]) -> None:
        nonlocal num_samples
        args = (str(output_dir), len(entries) + len(pending), num_samples, texts)
        num_samples += len(texts)
        if pool is None:
            entries.append(_write_shard(*args))
            return
        pending.append(pool.submit(_write_shard, *args))
        while len(pending) > 2 * workers:  # bound memory: at most 2 queued shards per worker
            entries.append(pending.popleft().result())

    try:
        for path in files:
            cleaner = _Cleaner(jsonl=field is not None or _is_jsonl(path), field=field or "text", dedup=dedup,
                               min_chars=min_chars, max_chars=max_chars)
            if cleaners:
                cleaner.seen = cleaners[-1].seen  # dedup spans all inputs
            cleaners.append(cleaner)
            last = 0
            for lines, consumed in _raw_blocks(path):
                buffer.extend(cleaner.clean(lines))
                while len(buffer) >= shard_size:
                    flush(buffer[:shard_size])
                    del buffer[:shard_size]
                bar.update(consumed - last)
                bar.set_postfix(sentences=num_samples + len(buffer), refresh=False)
                last = consumed
        if buffer:
            flush(buffer)
        while pending:
            entries.append(pending.popleft().result())
    except BaseException:
        for fut in pending:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        for tmp in output_dir.glob(".shard-*.tar.tmp"):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True)

    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for cleaner in cleaners:
        for reason, count in cleaner.skipped.items():
            skipped[reason] += count
    num_lines = sum(c.lines for c in cleaners)
    if num_samples == 0:
        raise UserError(f"no valid sentences in {len(files)} input file(s) ({num_lines} lines; skipped: "
                        + ", ".join(f"{k}={v}" for k, v in skipped.items() if v) + ")")
    manifest = {
        "format": "webdataset",
        "version": FORMAT_VERSION,
        "num_samples": num_samples,
        "num_shards": len(entries),
        "num_lines": num_lines,
        "skipped": skipped,
        "options": options,
        "inputs": records,
        "shards": entries,
    }
    _write_json_atomic(output_dir / MANIFEST, manifest)
    keep = {e["name"] for e in entries}
    for old in output_dir.glob("shard-*.tar"):  # shards of an earlier, larger build
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="FILE_OR_GLOB",
                        help="text (one sentence a line), .gz text or .jsonl file, or a glob; repeatable")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for shard-*.tar + manifest.json")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    parser.add_argument("--field", default=None,
                        help="JSON field holding the sentence (default 'text'); giving it reads every input as jsonl")
    parser.add_argument("--workers", type=int, default=1, help="writer processes (output is identical for any)")
    parser.add_argument("--dedup", action="store_true", help="drop exact duplicate sentences (after stripping)")
    parser.add_argument("--min-chars", type=int, default=1, help="drop shorter sentences")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="drop longer sentences")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    manifest = build_shards(
        args.input,
        args.output,
        shard_size=args.shard_size,
        field=args.field,
        workers=args.workers,
        dedup=args.dedup,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        progress=not args.no_progress,
    )
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items() if v) or "none"
    print(f"wrote {manifest['num_samples']} sentences in {manifest['num_shards']} shards to {args.output} "
          f"({manifest['num_lines']} lines read; skipped: {skipped})")
    return 0
