"""`optim.epochs`: the run's optimizer steps derived from the stream's batches per epoch."""

from __future__ import annotations

import pytest

from tests.test_engine import tiny_config
from trainer.config import ConfigError, load_config
from trainer.engine import train


def test_with_epochs_derives_max_steps():
    cfg = load_config(None, ["optim.epochs=2", "optim.grad_accum=3"])
    assert cfg.with_epochs(lambda epoch: 10 + epoch).optim.max_steps == 7  # (10 + 11) // 3
    assert load_config(None).with_epochs(lambda epoch: 10).optim.max_steps == 1000  # epochs 0: max_steps
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(None, ["optim.epochs=1", "optim.warmup_steps=50"]).with_epochs(lambda epoch: 20)


def test_one_epoch_run(tmp_path):
    # 240 sentences, batch 8, one process: 30 batches per epoch; grad_accum 3 -> 10 optimizer steps.
    cfg = tiny_config(tmp_path, "epochs", "optim.epochs=1", "optim.grad_accum=3", "optim.warmup_steps=0",
                      "eval.sts_dir=", "tracking.enabled=false")
    result = train(cfg)
    assert [step for step, _ in result.losses] == list(range(1, 11))
