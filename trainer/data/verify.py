"""`data.verify: sha256`: a shard's bytes against the checksum its manifest.json lists, once per process.

`size` (the default) compares file sizes only, which catches truncation but not bytes changed in place. Under
`sha256` every shard with a listed checksum is hashed when the stream is built, and again when it is opened
for reading if its (path, size, mtime) changed since: a process hashes each shard file once. URL shards are
downloaded once more for it and cached by URL (a URL has no mtime). DataLoader workers forked after the stream
was built inherit the cache. The cost is measured in benchmarks/README_data.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Optional

from trainer.data.shard_format import is_url

__all__ = ["VERIFY_MODES", "check_sha256", "clear_cache"]

VERIFY_MODES = ("size", "sha256")

# (path, size, mtime_ns) of a local file, or (url,): the sha256 seen there in this process
_verified: dict[tuple, str] = {}


def clear_cache() -> None:
    """Forget every verification of this process (tests)."""
    _verified.clear()


def _sha256(url: str, local: bool) -> str:
    """Hex sha256 of the raw bytes (compressed shards are hashed as stored, like the manifest's)."""
    if local:
        with open(url, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    import webdataset as wds

    digest = hashlib.sha256()
    stream = wds.gopen(url, "rb")
    try:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    finally:
        with contextlib.suppress(Exception):  # a failed command reported its error while reading
            stream.close()
    return digest.hexdigest()


def check_sha256(url: str, expected: str) -> Optional[str]:
    """None when the shard at `url` hashes to `expected` (cached), else why not, for a ShardError."""
    local = not is_url(url)
    try:
        if local:
            st = os.stat(url)
            key: tuple = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
        else:
            key = (url,)
        if _verified.get(key) == expected:
            return None
        digest = _sha256(url, local)
    except OSError as exc:
        return f"cannot read it to verify its sha256 ({exc})"
    if digest != expected.lower():
        return (f"sha256 {digest[:16]}... differs from {expected[:16]}... in manifest.json "
                "(contents corrupt or replaced)")
    _verified[key] = expected
    return None
