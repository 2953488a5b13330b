"""The run's output folder: one run at a time, failed writes named, metrics that a resume rewinds.

- `OutputLock`: an exclusive `flock` on `<output_dir>/.run.lock`, held by rank 0 for the run's life. Two runs
  writing the same folder interleave metrics.jsonl and rename each other's checkpoints; the second now stops
  at once. The OS drops the lock when its process dies (also on SIGKILL), so a stale lock never blocks.
- `writing(what, path)`: turns a failed write (disk full, no permission, read-only file system) into one
  `error:` line naming the file. torch reports a full disk as "unexpected pos 576 vs 534" and safetensors
  as its own exception type; both are recognised.
- `rewind_metrics(path, step)`: on resume, drops the lines of steps after the checkpoint (they are logged
  again), so metrics.jsonl holds each step once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from trainer.errors import UserError

LOCK_FILE = ".run.lock"
# How torch's zip writer and safetensors say that a write failed (they raise no OSError).
_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos", "I/O error")


class OutputLock:
    """Exclusive lock on an output folder; `acquire` raises UserError when another live process holds it."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fh = None

    def acquire(self) -> "OutputLock":
        with writing("the run lock", self.path):
            fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(
                f"{self.output_dir} is in use by another run ({holder}); wait for it to end or choose another "
                "output_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
            except OSError:
                return ""
    return ""


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError) and any(sign in text for sign in _WRITE_FAILURES)
    )


@contextlib.contextmanager
def writing(what: str, path: str | Path) -> Iterator[None]:
    """Run a write; a failed one becomes `UserError("could not write <what> <path>: <reason>")`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not _is_write_failure(exc):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
        raise UserError(f"could not write {what} {path}: {reason}{_free_space(Path(path))}") from exc


def rewind_metrics(path: str | Path, step: int) -> int:
    """Keep the metrics.jsonl lines of steps <= `step` (and drop a line cut off by a kill); returns how many
    lines were dropped. The file is replaced atomically."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        row: Optional[dict] = None
        try:
            row = json.loads(line)
        except ValueError:
            pass
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with writing("metrics", tmp):
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
    return dropped
