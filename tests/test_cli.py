"""The `python -m trainer` front end: --version, train's config flags, error and interrupt exit codes, env and
logging defaults, and that `shard` keeps the heavy modules (MLflow, matplotlib, transformers) unimported."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainer
from trainer.cli import main, version
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_version_prints_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code in (0, None)
    assert capsys.readouterr().out == f"trainer {importlib.metadata.version('contrastive-trainer')}\n"
    out = subprocess.run([sys.executable, "-m", "trainer", "--version"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("trainer ")


def test_version_falls_back_to_the_package_version_without_metadata(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version() == trainer.__version__  # the string setup.py reads


def test_train_print_config_takes_an_override_swallowed_by_resume(capsys):
    assert main(["train", "--resume", "optim.lr=3e-5", "--print-config"]) == 0
    assert "lr: 3.0e-05" in capsys.readouterr().out
    assert main(["train", "--list-keys"]) == 0
    assert "optim.lr = " in capsys.readouterr().out


def test_user_error_is_one_line_and_exit_2_unless_verbose(capsys):
    assert main(["train", "no_such.key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError):
        main(["-v", "train", "no_such.key=1"])


def test_keyboard_interrupt_exits_130(monkeypatch, tmp_path, capsys):
    import trainer.export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.export, "export", interrupted)
    assert main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_env_and_logging_defaults(monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert main(["train", "--list-keys"]) == 0
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert logging.getLogger("accelerate").level == logging.WARNING


def test_shard_defaults_are_build_shards_defaults(tmp_path, capsys):
    from trainer.data import build_shards

    (tmp_path / "c.txt").write_text("".join(f"sentence number {i}\n" for i in range(5)))
    assert main(["shard", "--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "wrote 5 sentences in 1 shards" in capsys.readouterr().out
    defaults = inspect.signature(build_shards).parameters
    options = json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]
    assert options["shard_size"] == defaults["shard_size"].default
    assert options["max_chars"] == defaults["max_chars"].default


def test_shard_does_not_import_mlflow_or_matplotlib(tmp_path):
    (tmp_path / "c.txt").write_text("one sentence\nanother sentence\n")
    code = (
        "import sys; from trainer.cli import main; "
        f"assert main(['shard', '--input', {str(tmp_path / 'c.txt')!r}, '--output', {str(tmp_path / 'out')!r}, "
        "'--no-progress']) == 0; "
        "print(sorted(m for m in ('mlflow', 'matplotlib', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
