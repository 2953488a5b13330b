"""Mechanism metrics (trainer/losses/metrics.py) against dense float64 definitions written here, and the
objective's logging protocol: cheap ones every call, the extra pass only when ``log_mechanisms`` is set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.config import LossConfig
from trainer.losses import build_objective, iftcl_loss, infonce_loss, softcse_loss
from trainer.losses.guided import FrozenViews
from trainer.losses.metrics import hardest_negative_logs, hardest_negatives

EXACT = dict(rtol=1e-12, atol=1e-13)


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def dense_hardest(A, C, pos):
    S = A @ C.T
    S[torch.arange(len(A)), pos] = float("-inf")
    return S.max(1)


@pytest.mark.parametrize("block", [None, 1, 3, 64])
def test_hardest_negative_is_the_row_max_over_non_positive_columns(block):
    A, C = unit(6, 8, seed=1), unit(11, 8, seed=2)
    pos = torch.tensor([6, 7, 8, 9, 10, 0])  # rank-offset positives and a wrap
    C[3] = A[0] * 0.999 + 0.001 * C[3]  # a near-duplicate negative of row 0
    sim, index = hardest_negatives(A, C, pos, block_size=block)
    want = dense_hardest(A, C, pos)
    torch.testing.assert_close(sim, want.values, **EXACT)
    assert torch.equal(index, want.indices) and index[0] == 3


@pytest.mark.parametrize("block", [None, 2])
def test_hardest_negative_leaves_out_the_loss_exclude_columns(block):
    """Pair data: a column holding a duplicate of the row's own text is no negative for the loss, so neither
    for the metric (the near-duplicate column 3 would otherwise be row 0's hardest negative)."""
    A, C = unit(6, 8, seed=1), unit(11, 8, seed=2)
    pos = torch.tensor([6, 7, 8, 9, 10, 0])
    C[3] = A[0] * 0.999 + 0.001 * C[3]
    row_keys, col_keys = torch.arange(100, 106), torch.arange(200, 211)
    col_keys[3] = 100  # column 3 is row 0's own text again
    sim, index = hardest_negatives(A, C, pos, block_size=block, exclude=(row_keys, col_keys))
    S = A.double() @ C.double().T
    S[torch.arange(6), pos] = float("-inf")
    S[0, 3] = float("-inf")
    torch.testing.assert_close(sim, S.max(1).values, **EXACT)
    assert index[0] != 3
    logs = hardest_negative_logs(A, C, pos, exclude=(row_keys, col_keys))
    torch.testing.assert_close(logs["hardest_neg_sim"], S.max(1).values.mean(), **EXACT)


def test_negative_softmax_mass_is_one_minus_the_positive_probability():
    A, C, pos = unit(5, 8, seed=3), unit(9, 8, seed=4), torch.tensor([0, 2, 4, 6, 8])
    P = torch.softmax(A @ C.T / 0.05, dim=1)
    want = (1 - P[torch.arange(5), pos]).mean()
    torch.testing.assert_close(infonce_loss(A, C, positive_index=pos)["neg_softmax_mass"], want, **EXACT)
    # SoftCSE: the loss's own (weighted) softmax
    S = A @ C.T
    logits = S / 0.05 + 2.0 * torch.log((1 - S.clamp(-1, 1)) / 2)
    logits[torch.arange(5), pos] = S[torch.arange(5), pos] / 0.05
    want_w = (1 - torch.softmax(logits, 1)[torch.arange(5), pos]).mean()
    got_w = softcse_loss(A, C, gamma=2.0, positive_index=pos)["neg_softmax_mass"]
    torch.testing.assert_close(got_w, want_w, **EXACT)


def test_hardest_weight_and_tau_follow_the_family_and_the_guide():
    A, C, pos = unit(4, 8, seed=5), unit(8, 8, seed=6), torch.tensor([4, 5, 6, 7])
    sim = dense_hardest(A, C, pos)
    logs = hardest_negative_logs(A, C, pos, softcse_family={"weight_gamma": 2.0})
    torch.testing.assert_close(logs["hardest_neg_sim"], sim.values.mean(), **EXACT)
    torch.testing.assert_close(logs["hardest_neg_weight"], (((1 - sim.values) / 2) ** 2).mean(), **EXACT)
    ramp = {"tau_min": 0.1, "tau_max": 0.02, "tau_gamma": 1.0}  # a hard_soft family: ends swapped
    logs = hardest_negative_logs(A, C, pos, softcse_family=ramp, temperature=0.05)
    torch.testing.assert_close(logs["hardest_neg_tau"], (0.1 - 0.08 * (1 + sim.values) / 2).mean(), **EXACT)
    GA, GC = unit(4, 3, seed=7), unit(8, 3, seed=8)
    t = (GA * GC[sim.indices]).sum(1)  # the frozen similarity of the SAME (row, hardest column) pairs
    logs = hardest_negative_logs(A, C, pos, softcse_family={"weight_gamma": 1.0}, guide=(GA, GC))
    torch.testing.assert_close(logs["hardest_neg_weight"], ((1 - t) / 2).mean(), **EXACT)


def test_twins_metrics():
    A, I, Fr = unit(6, 8, seed=9), unit(6, 8, seed=10), unit(6, 8, seed=11)
    out = iftcl_loss(A, I, Fr, margin_low=-0.1, margin_high=0.1)
    d = (A * I).sum(1) - (A * Fr).sum(1)
    torch.testing.assert_close(out["margin_mean"], d.mean(), **EXACT)
    active = ((d < -0.1) | (d > 0.1)).double()
    torch.testing.assert_close(out["hinge_active_frac"], active.mean(), **EXACT)
    rows = torch.tensor([True, True, False, True, False, True])
    masked = iftcl_loss(A, I, Fr, margin_low=-0.1, margin_high=0.1, twins_mask=rows)
    torch.testing.assert_close(masked["hinge_active_frac"], active[rows].mean(), **EXACT)
    torch.testing.assert_close(out["neg_softmax_mass"], infonce_loss(A, I)["neg_softmax_mass"], **EXACT)


def call(objective, seed, n=4, world=2, frozen=None, unchanged=None):
    A, C = unit(n, 8, seed=seed, dtype=torch.float32), unit(n * world, 8, seed=seed + 1, dtype=torch.float32)
    Fr = unit(n * world, 8, seed=seed + 2, dtype=torch.float32) if objective.needs_fraternal else None
    pos = torch.arange(n) + n
    out = objective(A, C, positive_index=pos, fraternal=Fr, frozen=frozen, fraternal_unchanged=unchanged)
    objective.enqueue(C)
    return out


EXTRA_PASS = {"hardest_neg_sim", "hardest_neg_weight", "hardest_neg_tau", "queue_fill"}


@pytest.mark.parametrize("cfg, expected", [
    (LossConfig(name="infonce", queue_size=12), {"hardest_neg_sim", "queue_fill"}),
    (LossConfig(name="softcse", gamma=1.0), {"hardest_neg_sim", "hardest_neg_weight"}),
    (LossConfig(name="softcse", softcse_mode="temperature", tau_min=0.03, tau_max=0.1, tau_direction="hard_soft"),
     {"hardest_neg_sim", "hardest_neg_tau"}),
    (LossConfig(name="iftcl", queue_size=6, contrastive="softcse", gamma=2.0),
     {"hardest_neg_sim", "hardest_neg_weight", "queue_fill"}),
])
def test_objective_logs_the_extra_pass_only_on_logged_steps(cfg, expected):
    objective = build_objective(cfg)
    unchanged = torch.tensor([True, False, False, False]) if objective.needs_fraternal else None
    quiet = call(objective, seed=1, unchanged=unchanged)
    assert not EXTRA_PASS & set(quiet) and {"pos_sim", "neg_softmax_mass"} <= set(quiet)
    objective.log_mechanisms = True
    loud = call(objective, seed=1, unchanged=unchanged)
    assert EXTRA_PASS & set(loud) == expected
    assert all(torch.is_tensor(v) and v.numel() == 1 and not v.requires_grad for k, v in loud.items() if k != "loss")
    if "queue_fill" in expected:
        assert loud["queue_fill"].item() == pytest.approx(min(8, cfg.queue_size) / cfg.queue_size)
    if objective.needs_fraternal:
        assert {"margin_mean", "hinge_active_frac"} <= set(loud) and "margin" not in loud
        assert loud["fraternal_unchanged_frac"].item() == 0.25


def test_objective_hardest_weight_reads_the_frozen_similarity():
    objective = build_objective(LossConfig(name="softcse", gamma=1.0, weight_source="frozen"))
    objective.log_mechanisms = True
    frozen = FrozenViews(unit(4, 3, seed=20, dtype=torch.float32), unit(8, 3, seed=21, dtype=torch.float32))
    out = call(objective, seed=5, frozen=frozen)
    A, C = unit(4, 8, seed=5, dtype=torch.float32), unit(8, 8, seed=6, dtype=torch.float32)
    _, index = hardest_negatives(A, C, torch.arange(4) + 4)
    t = (frozen.anchors * frozen.candidates[index]).sum(1)
    assert out["hardest_neg_weight"].item() == pytest.approx(((1 - t) / 2).mean().item(), rel=1e-5)


def test_objective_hardest_negative_takes_the_loss_exclude_keys():
    """Pair data: the objective hands its exclude keys (queue keys appended) to the metric."""
    objective = build_objective(LossConfig(name="infonce"))
    objective.log_mechanisms = True
    A, C = unit(4, 8, seed=30), unit(8, 8, seed=31)
    C[5] = A[0] * 0.999 + 0.001 * C[5]  # row 0's own text again, in column 5
    row_keys, col_keys = torch.arange(4), torch.arange(10, 18)
    col_keys[5] = 0
    pos = torch.arange(4)
    out = objective(A, C, positive_index=pos, exclude=(row_keys, col_keys))
    want, _ = hardest_negatives(A, C, pos, exclude=(row_keys, col_keys))
    torch.testing.assert_close(out["hardest_neg_sim"], want.mean(), **EXACT)
    unmasked, _ = hardest_negatives(A, C, pos)
    assert out["hardest_neg_sim"] < unmasked.mean()
