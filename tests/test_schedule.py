"""`optim.scheduler` and `optim.warmup_ratio`: the LR of every optimizer step, for each curve."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import runtime
from trainer.config import ConfigError, load_config


def _lrs(*overrides: str) -> list[float]:
    """LR used by optimizer steps 1..max_steps (the engine steps the scheduler once after each)."""
    cfg = load_config(None, ["optim.lr=1.0", "optim.max_steps=10", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = runtime.build_scheduler(optimizer, cfg.optim)
    out = []
    for _ in range(cfg.optim.max_steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def _cos(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


WARM = [0.0, 0.5]  # two warmup steps from 0, as HF Trainer's warmup
CURVES = {
    "linear": WARM + [(10 - k) / 8 for k in range(2, 10)],
    "cosine": WARM + [_cos((k - 2) / 8) for k in range(2, 10)],
    "constant": WARM + [1.0] * 8,
    # decay_ratio 0.2: 2 warmup, 6 stable, 2 cosine-decay steps
    "warmup_stable_decay": WARM + [1.0] * 6 + [_cos(0.0), _cos(0.5)],
}


@pytest.mark.parametrize("name", sorted(CURVES))
def test_lr_curve(name):
    got = _lrs(f"optim.scheduler={name}", "optim.warmup_steps=2", "optim.decay_ratio=0.2")
    assert got == pytest.approx(CURVES[name], abs=1e-12)


def test_warmup_ratio_rounds_up_like_hf_trainer():
    assert _lrs("optim.scheduler=constant", "optim.warmup_ratio=0.15")[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert load_config(None, ["optim.max_steps=10", "optim.warmup_ratio=0.15"]).optim.num_warmup_steps() == 2


def test_no_warmup_starts_at_the_peak():
    assert _lrs("optim.scheduler=linear")[:2] == pytest.approx([1.0, 0.9])


@pytest.mark.parametrize("overrides", [
    ["optim.warmup_steps=2", "optim.warmup_ratio=0.1"],
    ["optim.warmup_ratio=1.0"],
    ["optim.scheduler=warmup_stable_decay", "optim.max_steps=10", "optim.warmup_steps=5", "optim.decay_ratio=0.6"],
    ["optim.scheduler=step"],
])
def test_bad_schedules_are_config_errors(overrides):
    with pytest.raises(ConfigError):
        load_config(None, overrides)
