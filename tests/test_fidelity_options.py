"""Issue 14 loss options, in float64 against formulas written here: SoftCSE tau_direction and guide (weights
from a frozen encoder), IFTCL fraternal_weight, reference_margin (innate margin), stop_grad_identical and
twins_mask; each with its exact limit (the option at its neutral value is the original loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, LossConfig
from trainer.losses import build_objective, iftcl_loss, infonce_loss, softcse_loss
from trainer.losses.guided import FrozenViews, guided_lse

EXACT = dict(rtol=1e-13, atol=1e-14)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def dense_softcse(A, C, pos, tau, *, weight_sim=None, weight_gamma=0.0, ramp=None, normalize=False):
    """Mean of -s_ip/tau + log(exp(s_ip/tau) + sum_{j!=p} w_ij exp(s_ij/tau_ij)), with w and tau functions of
    ``weight_sim`` (default: sg(s)) and ``ramp(t) -> tau``; autograd flows through s only."""
    S = A @ C.T
    T = (S if weight_sim is None else weight_sim).detach().clamp(-1, 1)
    is_pos = torch.zeros_like(S, dtype=torch.bool)
    is_pos[torch.arange(len(A)), pos] = True
    W = ((1 - T) / 2) ** weight_gamma
    if normalize:
        W = W / (W.masked_fill(is_pos, 0).sum(1, keepdim=True) / (C.shape[0] - 1))
    W = W.masked_fill(is_pos, 1.0)
    tau_NM = torch.full_like(S, tau) if ramp is None else ramp(T).masked_fill(is_pos, tau)
    logits = S / tau_NM + torch.log(W)
    return (torch.logsumexp(logits, 1) - S[torch.arange(len(A)), pos] / tau).mean()


def loss_and_grads(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    loss = out["loss"] if isinstance(out, dict) else out
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def assert_same(got, want, **tol):
    (l1, g1), (l2, g2) = got, want
    torch.testing.assert_close(l1, l2, **(tol or EXACT))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **(tol or EXACT))


# ----------------------------------------------------------------------------------------------------------
# SoftCSE temperature direction


@pytest.mark.parametrize("kernel", ["chunked", "reference"])
def test_hard_soft_ramps_the_other_way(kernel):
    A, C, pos = unit(5, 8, seed=1), unit(7, 8, seed=2), torch.tensor([0, 2, 4, 6, 1])
    tau, lo, hi, gamma = 0.05, 0.03, 0.2, 1.5
    got = loss_and_grads(lambda a, c: softcse_loss(a, c, mode="temperature", temperature=tau, tau_min=lo,
                                                   tau_max=hi, gamma=gamma, positive_index=pos, kernel=kernel,
                                                   tau_direction="hard_soft"), A, C)
    ramp = lambda t: hi + (lo - hi) * ((1 + t) / 2) ** gamma  # noqa: E731  most similar -> tau_min
    assert_same(got, loss_and_grads(lambda a, c: dense_softcse(a, c, pos, tau, ramp=ramp), A, C))
    default = softcse_loss(A, C, mode="temperature", temperature=tau, tau_min=lo, tau_max=hi, gamma=gamma,
                           positive_index=pos, kernel=kernel)
    soft_hard = dense_softcse(A, C, pos, tau, ramp=lambda t: lo + (hi - lo) * ((1 + t) / 2) ** gamma)
    torch.testing.assert_close(default["loss"], soft_hard, **EXACT)  # the default is today's direction
    assert abs(default["loss"].item() - got[0].item()) > 1e-3


def test_hard_soft_limits_are_exact():
    A, C = unit(4, 6, seed=3), unit(4, 6, seed=4)
    same = softcse_loss(A, C, mode="temperature", tau_min=0.05, tau_max=0.05, tau_direction="hard_soft",
                        kernel="chunked")
    torch.testing.assert_close(same["loss"], infonce_loss(A, C, kernel="chunked")["loss"], **EXACT)
    # gamma = 0: the ramp's end value everywhere, i.e. tau_min for hard_soft
    flat = softcse_loss(A, C, mode="temperature", tau_min=0.04, tau_max=0.3, gamma=0.0, tau_direction="hard_soft",
                        kernel="chunked")
    want = dense_softcse(A, C, torch.arange(4), 0.05, ramp=lambda t: torch.full_like(t, 0.04))
    torch.testing.assert_close(flat["loss"], want, **EXACT)
    with pytest.raises(ValueError, match="tau_direction"):
        softcse_loss(A, C, mode="weight", tau_direction="hard_soft")
    with pytest.raises(ValueError, match="tau_direction"):
        softcse_loss(A, C, mode="temperature", tau_direction="sideways")


# ----------------------------------------------------------------------------------------------------------
# SoftCSE weights from a frozen encoder (guide)


@pytest.mark.parametrize("normalize", [False, True])
def test_guide_equal_to_the_inputs_is_the_unguided_loss(normalize):
    A, C, pos = unit(6, 8, seed=5), unit(9, 8, seed=6), torch.tensor([1, 3, 5, 7, 0, 8])
    kw = dict(mode="weight", gamma=2.0, normalize_weights=normalize, positive_index=pos, kernel="chunked")
    plain = loss_and_grads(lambda a, c: softcse_loss(a, c, **kw), A, C)
    guided = loss_and_grads(lambda a, c: softcse_loss(a, c, guide=(A, C), **kw), A, C)
    assert_same(guided, plain)


@pytest.mark.parametrize("mode", ["weight", "temperature"])
def test_guided_weights_follow_the_guide_similarity_and_carry_no_gradient(mode):
    A, C, pos = unit(5, 8, seed=7), unit(8, 8, seed=8), torch.tensor([0, 1, 2, 3, 4])
    GA, GC = unit(5, 4, seed=9), unit(8, 4, seed=10)  # another encoder, another dim
    family = dict(gamma=1.5) if mode == "weight" else dict(tau_min=0.03, tau_max=0.1, gamma=2.0)
    got = loss_and_grads(lambda a, c: softcse_loss(a, c, mode=mode, positive_index=pos, kernel="chunked",
                                                   guide=(GA, GC), **family), A, C)
    if mode == "weight":
        ref = lambda a, c: dense_softcse(a, c, pos, 0.05, weight_sim=GA @ GC.T, weight_gamma=1.5)  # noqa: E731
    else:
        ramp = lambda t: 0.03 + 0.07 * ((1 + t) / 2) ** 2.0  # noqa: E731
        ref = lambda a, c: dense_softcse(a, c, pos, 0.05, weight_sim=GA @ GC.T, ramp=ramp)  # noqa: E731
    assert_same(got, loss_and_grads(ref, A, C))
    self_weights = softcse_loss(A, C, mode=mode, positive_index=pos, kernel="chunked", **family)["loss"]
    assert abs(self_weights.item() - got[0].item()) > 1e-4


def test_guided_lse_block_walk_and_errors():
    A, C, GA, GC = unit(5, 8, seed=11), unit(37, 8, seed=12), unit(5, 3, seed=13), unit(37, 3, seed=14)
    pos = torch.arange(5) * 7
    whole = loss_and_grads(lambda a, c: guided_lse(a, c, GA, GC, weight_gamma=1.0, positive_index=pos).sum(), A, C)
    blocks = loss_and_grads(lambda a, c: guided_lse(a, c, GA, GC, weight_gamma=1.0, positive_index=pos,
                                                    block_size=4).sum(), A, C)
    assert_same(blocks, whole)
    with pytest.raises(ValueError, match="queue"):
        softcse_loss(A, C, positive_index=pos, guide=(GA, GC), queue=unit(3, 8))
    with pytest.raises(ValueError, match="guide"):
        softcse_loss(A, C, positive_index=pos, guide=(GA, GC[:10]))


# ----------------------------------------------------------------------------------------------------------
# IFTCL options


def iftcl_inputs(n=5, m=10, d=8):
    return unit(n, d, seed=20), unit(m, d, seed=21), unit(m, d, seed=22), torch.tensor([5, 6, 7, 8, 9])[:n]


def twins_by_hand(A, I, Fr, pos, low_N, high_N, rows=None):
    d = (A * I[pos]).sum(1) - (A * Fr[pos]).sum(1)
    h = torch.relu(low_N - d) + torch.relu(d - high_N)
    rows = torch.ones_like(h, dtype=torch.bool) if rows is None else rows
    return h[rows].sum() / max(int(rows.sum()), 1)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 3.0])
def test_fraternal_weight_mixes_the_two_contrastive_terms(weight):
    A, I, Fr, pos = iftcl_inputs()
    kw = dict(positive_index=pos, kernel="chunked", margin_low=0.0, margin_high=0.2)
    got = iftcl_loss(A, I, Fr, twins_weight=0.3, fraternal_weight=weight, **kw)
    l_i = infonce_loss(A, I, positive_index=pos, kernel="chunked")["loss"]
    l_f = infonce_loss(A, Fr, positive_index=pos, kernel="chunked")["loss"]
    twins = twins_by_hand(A, I, Fr, pos, 0.0, 0.2)
    torch.testing.assert_close(got["loss"], (l_i + weight * l_f) / (1 + weight) + 0.3 * twins, **EXACT)
    if weight == 1.0:  # the default is today's form, bit for bit
        assert torch.equal(got["loss"], iftcl_loss(A, I, Fr, twins_weight=0.3, **kw)["loss"])


def test_fraternal_weight_zero_without_twins_and_queue_is_infonce():
    A, I, Fr, pos = iftcl_inputs()
    got = loss_and_grads(lambda a, i, f: iftcl_loss(a, i, f, positive_index=pos, kernel="chunked", twins_weight=0.0,
                                                    fraternal_weight=0.0), A, I, Fr)
    want = loss_and_grads(lambda a, i, f: infonce_loss(a, i, positive_index=pos, kernel="chunked")["loss"]
                          + 0.0 * f.sum(), A, I, Fr)
    assert_same(got, want)


def test_reference_margin_centres_the_band_and_its_fixed_limit():
    A, I, Fr, pos = iftcl_inputs()
    kw = dict(positive_index=pos, kernel="chunked", margin_low=0.05, margin_high=0.25, twins_weight=1.0)
    centre = torch.full((5,), 0.15, dtype=torch.float64)
    fixed = loss_and_grads(lambda a, i, f: iftcl_loss(a, i, f, **kw), A, I, Fr)
    assert_same(loss_and_grads(lambda a, i, f: iftcl_loss(a, i, f, reference_margin=centre, **kw), A, I, Fr), fixed)
    ref = torch.tensor([0.9, -0.3, 0.0, 0.4, 1.2], dtype=torch.float64).requires_grad_()
    got = iftcl_loss(A.clone().requires_grad_(), I, Fr, reference_margin=ref, **kw)
    want = twins_by_hand(A, I, Fr, pos, ref.detach() - 0.1, ref.detach() + 0.1)
    torch.testing.assert_close(got["twins"], want, **EXACT)
    got["loss"].backward()
    assert ref.grad is None  # the reference is a constant


def test_innate_margin_of_the_frozen_views():
    e, f = unit(4, 6, seed=30), unit(4, 6, seed=31)
    torch.testing.assert_close(FrozenViews(e, None, f).innate_margin(), 1 - (e * f).sum(1), **EXACT)
    with pytest.raises(ValueError, match="fraternal"):
        FrozenViews(e).innate_margin()


def test_stop_grad_identical_keeps_the_value_and_moves_only_the_fraternal_twin():
    A, I, Fr, pos = iftcl_inputs()
    kw = dict(positive_index=pos, kernel="chunked", margin_low=0.3, margin_high=0.4, twins_weight=1.0)
    full = loss_and_grads(lambda a, i, f: iftcl_loss(a, i, f, **kw), A, I, Fr)
    stopped = loss_and_grads(lambda a, i, f: iftcl_loss(a, i, f, stop_grad_identical=True, **kw), A, I, Fr)
    contrastive_only = loss_and_grads(lambda a, i, f: iftcl_loss(a, i, f, **{**kw, "twins_weight": 0.0}), A, I, Fr)
    torch.testing.assert_close(stopped[0], full[0], **EXACT)
    torch.testing.assert_close(stopped[1][1], contrastive_only[1][1], **EXACT)  # identical: contrastive only
    torch.testing.assert_close(stopped[1][2], full[1][2], **EXACT)  # fraternal: unchanged
    assert (full[1][1] - contrastive_only[1][1]).abs().max() > 1e-3  # the hinge did push the identical twin


def test_twins_mask_is_a_masked_mean_with_exact_limits():
    A, I, Fr, pos = iftcl_inputs()
    kw = dict(positive_index=pos, kernel="chunked", margin_low=0.3, margin_high=0.35, twins_weight=1.0)
    plain = iftcl_loss(A, I, Fr, **kw)
    every = iftcl_loss(A, I, Fr, twins_mask=torch.ones(5, dtype=torch.bool), **kw)
    torch.testing.assert_close(every["loss"], plain["loss"], **EXACT)
    rows = torch.tensor([True, False, True, False, False])
    got = iftcl_loss(A, I, Fr, twins_mask=rows, **kw)
    torch.testing.assert_close(got["twins"], twins_by_hand(A, I, Fr, pos, 0.3, 0.35, rows), **EXACT)
    none = iftcl_loss(A, I, Fr, twins_mask=torch.zeros(5, dtype=torch.bool), **kw)
    assert none["twins"].item() == 0.0 and math.isfinite(none["loss"].item())
    with pytest.raises(ValueError, match="twins_mask"):
        iftcl_loss(A, I, Fr, twins_mask=rows.double(), **kw)


# ----------------------------------------------------------------------------------------------------------
# Config and objective wiring


def test_config_defaults_are_todays_behaviour_and_bad_combinations_fail():
    cfg = LossConfig()
    assert (cfg.tau_direction, cfg.weight_source, cfg.fraternal_weight, cfg.twins_reference) == \
        ("soft_hard", "self", 1.0, "fixed")
    assert not cfg.twins_stop_grad_identical and not cfg.twins_exclude_unchanged
    for kwargs, match in [(dict(name="infonce", weight_source="frozen"), "weight_source"),
                          (dict(name="softcse", weight_source="frozen", queue_size=8), "weight_source"),
                          (dict(name="softcse", twins_reference="initial"), "twins_reference"),
                          (dict(name="softcse", tau_direction="hard_soft"), "tau_direction"),
                          (dict(name="iftcl", fraternal_weight=-1.0), "fraternal_weight")]:
        with pytest.raises(ConfigError, match=match):
            LossConfig(**kwargs)


def test_objective_passes_the_frozen_views_and_unchanged_rows():
    A, I, Fr, pos = iftcl_inputs()
    frozen = FrozenViews(unit(5, 4, seed=40), unit(10, 4, seed=41), unit(5, 4, seed=42))
    unchanged = torch.tensor([False, True, False, False, True])
    cfg = LossConfig(name="iftcl", kernel="chunked", twins_reference="initial", twins_exclude_unchanged=True,
                     fraternal_weight=0.5, twins_stop_grad_identical=True)
    objective = build_objective(cfg)
    assert objective.needs_frozen
    with pytest.raises(ValueError, match="frozen"):
        objective(A, I, positive_index=pos, fraternal=Fr)
    out = objective(A, I, positive_index=pos, fraternal=Fr, frozen=frozen, fraternal_unchanged=unchanged)
    want = iftcl_loss(A, I, Fr, positive_index=pos, kernel="chunked", fraternal_weight=0.5, stop_grad_identical=True,
                      reference_margin=frozen.innate_margin(), twins_mask=~unchanged)
    torch.testing.assert_close(out["loss"], want["loss"], **EXACT)
    assert out["fraternal_unchanged_frac"].item() == pytest.approx(0.4)

    softcse = build_objective(LossConfig(name="softcse", kernel="chunked", weight_source="frozen", gamma=2.0))
    A2, C2 = unit(3, 8, seed=43), unit(6, 8, seed=44)
    frozen2 = FrozenViews(unit(3, 4, seed=45), unit(6, 4, seed=46))
    got = softcse(A2, C2, positive_index=torch.tensor([3, 4, 5]), frozen=frozen2)
    want = softcse_loss(A2, C2, gamma=2.0, positive_index=torch.tensor([3, 4, 5]), kernel="chunked",
                        guide=(frozen2.anchors, frozen2.candidates))
    torch.testing.assert_close(got["loss"], want["loss"], **EXACT)


HARD_SOFT_ON_TRITON = """
import torch, torch.nn.functional as F
from trainer.losses import softcse_loss
g = torch.Generator().manual_seed(0)
A, C = F.normalize(torch.randn(16, 32, generator=g), dim=1), F.normalize(torch.randn(24, 32, generator=g), dim=1)
out = {}
for kernel in ("triton", "reference"):
    a, c = A.clone().requires_grad_(), C.clone().requires_grad_()
    loss = softcse_loss(a, c, mode="temperature", tau_min=0.03, tau_max=0.2, gamma=1.5, tau_direction="hard_soft",
                        kernel=kernel)["loss"]
    loss.backward()
    out[kernel] = (loss.detach(), a.grad, c.grad)
for x, y in zip(out["triton"], out["reference"]):
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.slow
def test_hard_soft_on_the_triton_kernel_under_the_interpreter():
    """hard_soft hands the kernel a ramp whose start is above its end (negative tau delta)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", HARD_SOFT_ON_TRITON], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
