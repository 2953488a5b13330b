"""Launcher precision: `accelerate launch --mixed_precision X` (ACCELERATE_MIXED_PRECISION) applies unless the
run config sets `mixed_precision` itself; the log names the winner."""

from __future__ import annotations

import logging

import pytest

from trainer import runtime
from trainer.config import load_config


@pytest.fixture
def fresh_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize(
    "env, overrides, want, source",
    [
        ("bf16", [], "bf16", "launcher (ACCELERATE_MIXED_PRECISION)"),
        ("bf16", ["mixed_precision=no"], "no", "run config"),
        (None, [], "no", "default"),
        (None, ["mixed_precision=bf16"], "bf16", "run config"),
    ],
)
def test_precision_precedence(monkeypatch, caplog, fresh_state, env, overrides, want, source):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if env is None:
        monkeypatch.delenv(runtime.LAUNCHER_PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(runtime.LAUNCHER_PRECISION_ENV, env)
    cfg = load_config(None, overrides)
    with caplog.at_level(logging.INFO, logger="trainer.runtime"):
        accelerator = runtime.make_accelerator(cfg)
    assert accelerator.mixed_precision == want
    assert runtime.precision_source(cfg) == source
    assert f"mixed precision {want} (from {source})" in caplog.text


def test_default_leaves_precision_to_the_launcher():
    assert load_config(None).mixed_precision is None
