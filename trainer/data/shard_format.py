"""The shard format: webdataset .tar shards of sentences, their writer, a fast reader and the manifest.

Each sample is one tar member `<key>.txt` (UTF-8 sentence); the key is the sample's global index, zero-padded
to 10 digits, so keys are unique within a build and stable across re-runs. Headers are plain ustar with
mtime/uid/gid 0, so the same input gives byte-identical shards (and checksums) for any number of workers.

A built folder holds

    DIR/shard-000000.tar, shard-000001.tar, ...   `shard_size` samples each (the last may hold fewer)
    DIR/manifest.json                             shards (samples, bytes, sha256), totals, skip report, inputs

The reader streams (no seeks, so it works on pipes), skips samples without decoding them and reports every
truncation that loses a byte of a sample or the end-of-archive marker, which the exact split of the training
stream and its bad-shard policy need.

Shard names in a manifest are plain file names (`SAFE_NAME`): they are joined to folders and to URLs, and a
`pipe:` URL runs in a shell, so a name like `x.tar; rm -rf ~` must never get that far.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import zlib
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

from trainer.errors import UserError

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
FORMAT_VERSION = 1

_BLOCK = 512
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
"""What a shard name in a manifest may hold: no `/`, no shell metacharacter, no space."""
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
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


def tar_archive(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A complete tar archive of (member name, data) in order, with `tar_bytes`' deterministic headers (pair
    shards: `<key>.anchor.txt`, `<key>.positive.txt`, `<key>.negatives.json` per sample)."""
    parts: list[bytes] = []
    total = 0
    for name, data in members:
        pad = -len(data) % _BLOCK
        parts += (_member_header(name.encode("ascii"), len(data)), data, b"\0" * pad)
        total += _BLOCK + len(data) + pad
    total += 2 * _BLOCK
    parts.append(b"\0" * (2 * _BLOCK + (-total % _RECORD)))
    return b"".join(parts)


def sample_key(index: int) -> str:
    """Key of the sample with global index `index` in a build."""
    return f"{index:010d}"


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
    """(member name, data) of every regular file; raises ShardError on a truncated or corrupt archive.

    Truncation anywhere is an error: a partial header, member data or its block padding past the end of the
    file, or a missing end-of-archive marker (two zero blocks). After the marker only zero padding to whole
    blocks may follow (tar writers pad to 10 KiB records, or not at all), so a cut there loses no sample."""
    buf = b""
    pos = 0
    eof = False
    started = False  # any byte read: a zero-byte file is no archive at all, reported as an empty shard
    long_name: Optional[str] = None
    pax_name: Optional[str] = None
    while True:
        end = pos + _BLOCK
        if end > len(buf) and not eof:
            buf, pos, eof = _refill(stream, buf, pos, _BLOCK)
            end = pos + _BLOCK
            started = started or len(buf) > 0
        if end > len(buf):
            if not started:
                return
            where = "partial header" if pos < len(buf) else "no end-of-archive marker"
            raise ShardError(shard, f"truncated tar ({where} at end of file)")
        name_field, size_field, kind, magic, prefix = _HEADER.unpack_from(buf, pos)
        if magic != b"ustar":
            header = buf[pos:end]
            if header.count(0) == _BLOCK:
                _check_end(stream, buf[end:], shard)
                return
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
        padded = size + (-size % _BLOCK)
        if pos + padded > len(buf) and not eof:
            buf, pos, eof = _refill(stream, buf, pos, padded)
        if pos + padded > len(buf):
            got = min(len(buf) - pos, size)
            raise ShardError(shard, f"truncated tar (member data ends after {got} of {size} bytes"
                             + (")" if got < size else ", in its block padding)"))
        data = buf[pos : pos + size]
        pos += padded
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


def _check_end(stream: IO[bytes], rest: bytes, shard: str) -> None:
    """`rest`: what is buffered after the first zero block. The second zero block must follow, then only
    padding to whole blocks (its content is not checked: tar ignores it too)."""
    size = len(rest)
    second = rest[:_BLOCK]
    while len(second) < _BLOCK:
        chunk = stream.read(1 << 16)
        if not chunk:
            raise ShardError(shard, "truncated tar (end-of-archive marker cut short)")
        size += len(chunk)
        second += chunk[: _BLOCK - len(second)]
    if second.count(0) != _BLOCK:
        raise ShardError(shard, "corrupt tar (a zero block followed by data, not an end-of-archive marker)")
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        size += len(chunk)
    if size % _BLOCK:
        raise ShardError(shard, "truncated tar (record padding after the end-of-archive marker cut short)")


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


def is_url(item: str) -> bool:
    """A webdataset URL (`pipe:`, http(s), ...), as opposed to a local path (`file:` URLs are local paths)."""
    return bool(_SCHEME_RE.match(item)) and not item.startswith("file:")
def iter_tar_records(stream: IO[bytes], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of every sample (consecutive members sharing a key), whatever its members:
    the reader of pair shards, whose samples have no `txt` member."""
    key: Optional[str] = None
    record: dict[str, bytes] = {}
    for name, data in _tar_members(stream, shard):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot <= slash or (name.startswith("__", slash) and _META_RE.match(name[slash:])):
            continue
        if name[:dot] != key:
            if record:
                yield key, record  # type: ignore[misc]
            key, record = name[:dot], {}
        record[name[dot + 1 :].lower()] = data
    if record:
        yield key, record  # type: ignore[misc]


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
    """Parse manifest JSON text (from a file or a URL) and check its shape and its shard names."""
    try:
        manifest = json.loads(text)
        shards = manifest["shards"]
        for entry in shards:
            if not isinstance(entry["name"], str) or int(entry["num_samples"]) < 0:
                raise ValueError(entry)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: not a valid shard manifest ({exc})") from None
    for entry in shards:
        name = entry["name"]
        if not SAFE_NAME.fullmatch(name) or not name.strip("."):
            raise UserError(f"{where}: shard name {name!r} is not a plain file name (letters, digits, '.', '_', "
                            "'-'; no '/', no spaces); refusing the manifest")
    return manifest

