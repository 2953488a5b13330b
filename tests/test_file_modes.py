"""Saved models follow the umask like every other file (safetensors alone writes model.safetensors 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny_encoder_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


def test_save_and_export_follow_the_umask(tmp_path, umask_022):
    from trainer.export import export
    from trainer.model import SentenceEncoder

    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="cls_mlp")
    saved = model.save(tmp_path / "best")
    exported = export(saved, tmp_path / "export")
    for folder in (saved, exported):
        modes = _modes(folder)
        assert "model.safetensors" in modes
        assert set(modes.values()) == {0o644}, modes


def test_follow_umask_keeps_a_stricter_umask(tmp_path):
    from trainer.files import follow_umask

    old = os.umask(0o077)
    try:
        path = tmp_path / "f"
        path.write_text("x")
        os.chmod(path, 0o600)
        follow_umask(tmp_path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
