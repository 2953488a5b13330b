"""Config wiring: build_objective for every loss.name, the engine's call protocol, queue in checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, LossConfig, load_config
from trainer.losses import build_objective, iftcl_loss, infonce_loss, softcse_loss


def unit(n, d=8, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def engine_step(objective, seed, *, rank=1, local=3, world=2):
    """What trainer.engine does for one micro-batch on `rank`."""
    anchors = unit(local, seed=seed).requires_grad_()
    candidates = unit(local * world, seed=seed + 100).requires_grad_()
    fraternal = unit(local * world, seed=seed + 200).requires_grad_() if objective.needs_fraternal else None
    positive_index = torch.arange(local) + rank * local
    out = objective(anchors, candidates, positive_index=positive_index, fraternal=fraternal)
    out["loss"].backward()
    objective.enqueue(candidates.detach())
    return out, (anchors, candidates, fraternal, positive_index)


@pytest.mark.parametrize("name", ["infonce", "softcse", "iftcl"])
def test_build_objective_matches_the_loss_functions(name):
    cfg = LossConfig(name=name, temperature=0.07, gamma=2.0, kernel="chunked", margin_low=0.05, margin_high=0.3,
                     twins_weight=0.5)
    objective = build_objective(cfg)
    assert objective.needs_fraternal == (name == "iftcl")
    out, (a, c, f, pos) = engine_step(objective, seed=1)
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    assert all(not v.requires_grad and v.numel() == 1 for k, v in out.items() if k != "loss")
    common = dict(temperature=0.07, positive_index=pos)
    if name == "infonce":
        expected = infonce_loss(a, c, **common)
    elif name == "softcse":
        expected = softcse_loss(a, c, mode="weight", gamma=2.0, **common)
    else:
        expected = iftcl_loss(a, c, f, margin_low=0.05, margin_high=0.3, twins_weight=0.5, **common)
        assert {"contrastive", "twins"} <= set(out)
    assert out["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-6)


def test_softcse_temperature_and_iftcl_softcse_wiring():
    cfg = LossConfig(name="softcse", softcse_mode="temperature", tau_min=0.02, tau_max=0.1, gamma=1.5)
    out, (a, c, _, pos) = engine_step(build_objective(cfg), seed=2)
    ref = softcse_loss(a, c, mode="temperature", tau_min=0.02, tau_max=0.1, gamma=1.5, positive_index=pos)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)

    cfg = LossConfig(name="iftcl", contrastive="softcse", softcse_mode="weight", gamma=1.0, normalize_weights=True)
    out, (a, c, f, pos) = engine_step(build_objective(cfg), seed=3)
    ref = iftcl_loss(a, c, f, contrastive="softcse", mode="weight", gamma=1.0, normalize_weights=True,
                     positive_index=pos)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def test_queue_feeds_negatives_and_round_trips_through_torch_save():
    cfg = LossConfig(name="iftcl", queue_size=10)
    objective = build_objective(cfg)
    first, _ = engine_step(objective, seed=4)
    assert first["queue_len"].item() == 0
    engine_step(objective, seed=5)
    assert len(objective.queue) == 10  # 6 + 6 rows, capped at 10
    queue_before = objective.queue.negatives().clone()
    out, (a, c, f, pos) = engine_step(objective, seed=6)
    ref = iftcl_loss(a, c, f, queue=queue_before, positive_index=pos)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)

    buf = io.BytesIO()
    torch.save(objective.state_dict(), buf)
    buf.seek(0)
    resumed = build_objective(cfg)
    resumed.load_state_dict(torch.load(buf))
    a_out, _ = engine_step(objective, seed=7)
    b_out, _ = engine_step(resumed, seed=7)
    assert a_out["loss"].item() == b_out["loss"].item()
    torch.testing.assert_close(objective.queue.negatives(), resumed.queue.negatives(), rtol=0, atol=0)


def test_no_queue_enqueue_is_a_no_op_and_state_loads():
    objective = build_objective(LossConfig(name="infonce"))
    engine_step(objective, seed=8)
    assert objective.queue.negatives() is None and "queue_len" not in engine_step(objective, seed=9)[0]
    objective.load_state_dict(objective.state_dict())


def test_objective_errors():
    iftcl = build_objective(LossConfig(name="iftcl"))
    a, c = unit(2), unit(2, seed=1)
    with pytest.raises(ValueError, match="fraternal"):
        iftcl(a, c, positive_index=torch.arange(2))
    with pytest.raises(ValueError, match="no fraternal"):
        build_objective(LossConfig(name="infonce"))(a, c, positive_index=torch.arange(2), fraternal=c)
    with pytest.raises(ValueError, match="'iftcl'"):
        build_objective(LossConfig(name="infonce")).load_state_dict(iftcl.state_dict())


@pytest.mark.parametrize("overrides,match", [
    (["loss.name=softcse", "loss.tau_min=0.02", "loss.tau_max=0.1"], "temperature only"),
    (["loss.name=softcse", "loss.softcse_mode=temperature", "loss.normalize_weights=true"], "weight only"),
    (["loss.name=simcse"], "loss.name"),
    (["loss.margin_low=0.5"], "margin_low"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_config_overrides_reach_the_objective():
    cfg = load_config(None, ["loss.name=iftcl", "loss.queue_size=128", "loss.twins_weight=0.3",
                             "loss.contrastive=softcse", "loss.gamma=0.5"])
    objective = build_objective(cfg.loss)
    assert objective.queue.size == 128
    assert objective.iftcl["twins_weight"] == 0.3 and objective.iftcl["gamma"] == 0.5


RUNS = __import__("pathlib").Path(__file__).resolve().parent.parent / "launch_configs" / "runs"
EXPECTED = {"simcse": ("infonce", None), "softcse_weight": ("softcse", "weight"),
            "softcse_temp": ("softcse", "temperature"), "iftcl": ("iftcl", None)}


@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("variant", ["bert_base", "minilm_cpu"])
def test_method_run_yamls_build_their_objective(method, variant):
    cfg = load_config(RUNS / f"{method}_{variant}.yaml")
    name, mode = EXPECTED[method]
    assert cfg.loss.name == name and cfg.loss.temperature == 0.05 and cfg.data.batch_size == 64
    if mode:
        assert cfg.loss.softcse_mode == mode
    objective = build_objective(cfg.loss)
    assert objective.needs_fraternal == (name == "iftcl")
    if variant == "bert_base":  # SimCSE's unsupervised BERT-base settings
        assert (cfg.model.name_or_path, cfg.model.pooler, cfg.model.max_length) == ("bert-base-uncased", "cls_mlp", 32)
        assert (cfg.optim.lr, cfg.optim.max_steps, cfg.eval.every_steps) == (3e-5, 15625, 125)
