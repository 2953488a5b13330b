"""`checkpoint_keep` and the state file's name: `contrastive_state.json` (not HF Trainer's `trainer_state.json`,
whose schema differs), while checkpoints written by older versions under the old name still resume."""

from __future__ import annotations

import os

import pytest

from tests.test_engine import tiny_config
from trainer.checkpoint import LEGACY_STATE_FILE, STATE_FILE, list_checkpoints
from trainer.config import ConfigError, load_config
from trainer.engine import train


def test_keep_and_state_name_and_legacy_resume(tmp_path):
    quick = ("eval.sts_dir=", "tracking.enabled=false", "checkpoint_every=2", "log_every=1")
    cfg = tiny_config(tmp_path, "run", *quick, "optim.max_steps=6", "checkpoint_keep=3")
    old_umask = os.umask(0o022)
    try:
        train(cfg)
    finally:
        os.umask(old_umask)
    kept = list_checkpoints(cfg.output_dir)
    assert [p.name for p in kept] == ["step_00000002", "step_00000004", "step_00000006"]
    assert all((p / STATE_FILE).is_file() and not (p / LEGACY_STATE_FILE).exists() for p in kept)
    # every file of a checkpoint, Accelerate's model.safetensors included, follows the umask (not 0600)
    modes = {str(f.relative_to(kept[-1])): f.stat().st_mode & 0o777 for f in kept[-1].rglob("*") if f.is_file()}
    assert "state/model.safetensors" in modes and set(modes.values()) == {0o644}, modes

    # A checkpoint as version 0.1 wrote it: the state under HF Trainer's name.
    last = kept[-1]
    (last / STATE_FILE).rename(last / LEGACY_STATE_FILE)
    resumed = train(tiny_config(tmp_path, "run", *quick, "optim.max_steps=8", "checkpoint_keep=3"), resume=True)
    assert [step for step, _ in resumed.losses] == [7, 8]
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["step_00000004", "step_00000006", "step_00000008"]


def test_checkpoint_keep_must_keep_one():
    with pytest.raises(ConfigError, match="checkpoint_keep"):
        load_config(None, ["checkpoint_keep=0"])
