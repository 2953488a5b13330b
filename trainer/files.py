"""File modes of what the trainer writes: the process umask, like every other file.

safetensors (0.8) writes `model.safetensors` with mode 0600 whatever the umask (it writes a private temporary
file and renames it), so `best/`, checkpoints and exports came out unreadable for the rest of a team that
shares a run folder through group permissions. Our save points call `follow_umask` on what they wrote.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(root: str | Path) -> None:
    """Give every file under `root` (or `root` itself) written private (0600) the umask's mode instead."""
    root = Path(root)
    mode = 0o666 & ~current_umask()
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        if path.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            path.chmod(mode)
