"""Losses against independent float64 implementations written here (plain Python loops, and a dense torch
formula with explicitly detached weights for gradients), exact InfoNCE limits, gradcheck, stop-gradient,
extreme numerics, distributed equivalence and argument errors."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F

import kernels
from trainer.config import LossConfig
from trainer.losses import iftcl_loss, infonce_loss, softcse_loss

KERNELS = ["chunked", "reference"]


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Independent references


def loop_loss(A, C, pos, tau, *, weight_gamma=0.0, tau_min=None, tau_max=None, tau_gamma=1.0,
              normalize=False):
    """Mean over rows of -s_ip/tau + log(exp(s_ip/tau) + sum_{j!=p} w_ij exp(s_ij/tau_ij)), pure Python."""
    A, C, pos = A.tolist(), C.tolist(), [int(p) for p in pos]
    total = 0.0
    for i, a in enumerate(A):
        s = [sum(x * y for x, y in zip(a, c)) for c in C]
        clamp = [min(1.0, max(-1.0, v)) for v in s]
        weights = [((1.0 - clamp[j]) / 2.0) ** weight_gamma for j in range(len(C))]
        if normalize:
            negs = [weights[j] for j in range(len(C)) if j != pos[i]]
            mean_w = sum(negs) / len(negs)
            weights = [w / mean_w for w in weights]
        logits = []
        for j in range(len(C)):
            if j == pos[i]:
                logits.append(s[j] / tau)
                continue
            t = tau if tau_min is None else tau_min + (tau_max - tau_min) * ((1.0 + clamp[j]) / 2.0) ** tau_gamma
            if weights[j] > 0:
                logits.append(math.log(weights[j]) + s[j] / t)
        m = max(logits)
        total += m + math.log(sum(math.exp(x - m) for x in logits)) - s[pos[i]] / tau
    return total / len(A)


def loop_iftcl(A, I, Fr, pos, tau, *, queue=None, margin_low, margin_high, twins_weight, **family):
    cols_i = I if queue is None else torch.cat([I, queue])
    cols_f = Fr if queue is None else torch.cat([Fr, queue])
    contrastive = 0.5 * (loop_loss(A, cols_i, pos, tau, **family) + loop_loss(A, cols_f, pos, tau, **family))
    hinge = 0.0
    for i, a in enumerate(A.tolist()):
        d = sum(x * y for x, y in zip(a, I[int(pos[i])].tolist())) - sum(
            x * y for x, y in zip(a, Fr[int(pos[i])].tolist()))
        hinge += max(0.0, margin_low - d) + max(0.0, d - margin_high)
    return contrastive + twins_weight * hinge / len(A)


def dense_detached(a, c, pos, tau, *, weight_gamma=0.0, tau_min=None, tau_max=None, tau_gamma=1.0,
                   frozen_from=None):
    """Dense float64 torch formula whose weights/temperatures are DETACHED (computed from `frozen_from`
    = (a0, c0) when given, so finite differences of this function see constant weights)."""
    a0, c0 = frozen_from if frozen_from is not None else (a, c)
    s = a @ c.T
    sg = (a0 @ c0.T).detach().clamp(-1, 1)
    log_w = weight_gamma * torch.log((1 - sg) / 2) if weight_gamma > 0 else torch.zeros_like(sg)
    inv_t = torch.full_like(sg, 1 / tau) if tau_min is None else 1 / (
        tau_min + (tau_max - tau_min) * ((1 + sg) / 2) ** tau_gamma)
    rows = torch.arange(a.shape[0])
    mask = torch.zeros_like(sg, dtype=torch.bool)
    mask[rows, pos] = True
    log_w = log_w.masked_fill(mask, 0.0)
    inv_t = inv_t.masked_fill(mask, 1 / tau)
    lse = torch.logsumexp(s * inv_t + log_w, dim=1)
    return (lse - s[rows, pos] / tau).mean()


# ----------------------------------------------------------------------------------------------------------
# Values against the loops


@pytest.mark.parametrize("kernel", KERNELS)
def test_infonce_matches_loops(kernel):
    a, c = unit(5, 7, seed=1), unit(9, 7, seed=2)
    pos = torch.tensor([4, 5, 6, 7, 8])
    out = infonce_loss(a, c, temperature=0.07, positive_index=pos, kernel=kernel)
    assert out["loss"].dtype == torch.float64
    assert out["loss"].item() == pytest.approx(loop_loss(a, c, pos, 0.07), rel=1e-12, abs=1e-12)
    assert not out["pos_sim"].requires_grad


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gamma,normalize", [(1.0, False), (2.5, False), (0.5, True), (2.0, True)])
def test_softcse_weight_matches_loops(kernel, gamma, normalize):
    a, c = unit(6, 5, seed=3), unit(6, 5, seed=4)
    out = softcse_loss(a, c, mode="weight", temperature=0.05, gamma=gamma, normalize_weights=normalize,
                       kernel=kernel)
    ref = loop_loss(a, c, torch.arange(6), 0.05, weight_gamma=gamma, normalize=normalize)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tau_min,tau_max,gamma", [(0.03, 0.1, 1.0), (0.05, 0.2, 3.0), (0.2, 0.04, 0.5)])
def test_softcse_temperature_matches_loops(kernel, tau_min, tau_max, gamma):
    a, c = unit(6, 5, seed=5), unit(8, 5, seed=6)
    pos = torch.tensor([7, 0, 3, 2, 1, 5])
    out = softcse_loss(a, c, mode="temperature", temperature=0.05, gamma=gamma, tau_min=tau_min,
                       tau_max=tau_max, positive_index=pos, kernel=kernel)
    ref = loop_loss(a, c, pos, 0.05, tau_min=tau_min, tau_max=tau_max, tau_gamma=gamma)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("contrastive", ["infonce", "softcse"])
def test_iftcl_matches_loops(kernel, contrastive):
    a, i, f, q = unit(4, 6, seed=7), unit(8, 6, seed=8), unit(8, 6, seed=9), unit(5, 6, seed=10)
    pos = torch.arange(4) + 4
    kw = dict(margin_low=0.05, margin_high=0.1, twins_weight=0.7)
    family = {"mode": "weight", "gamma": 1.5} if contrastive == "softcse" else {}
    out = iftcl_loss(a, i, f, queue=q, temperature=0.05, positive_index=pos, contrastive=contrastive,
                     kernel=kernel, **kw, **family)
    ref = loop_iftcl(a, i, f, pos, 0.05, queue=q, **kw, weight_gamma=family.get("gamma", 0.0))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)
    assert out["loss"].item() == pytest.approx((out["contrastive"] + 0.7 * out["twins"]).item(), rel=1e-12)
    assert out["twins"].item() > 0  # random vectors: margins well outside [0.05, 0.1]


def test_queue_adds_negative_columns():
    a, c, q = unit(4, 6, seed=11), unit(4, 6, seed=12), unit(3, 6, seed=13)
    with_queue = infonce_loss(a, c, queue=q)["loss"]
    assert with_queue.item() == pytest.approx(loop_loss(a, torch.cat([c, q]), torch.arange(4), 0.05), rel=1e-12)
    assert with_queue.item() > infonce_loss(a, c)["loss"].item()


# ----------------------------------------------------------------------------------------------------------
# Exact limits


@pytest.mark.parametrize("kernel", KERNELS)
def test_softcse_limits_equal_infonce(kernel):
    a, c = unit(7, 8, seed=14, dtype=torch.float32), unit(7, 8, seed=15, dtype=torch.float32)
    base = infonce_loss(a, c, temperature=0.05, kernel=kernel)["loss"]
    for kw in (
        {"mode": "weight", "gamma": 0.0},
        {"mode": "weight", "gamma": 0.0, "normalize_weights": True},
        {"mode": "temperature", "gamma": 2.0, "tau_min": 0.05, "tau_max": 0.05},
        {"mode": "temperature", "gamma": 1.0},  # tau_min/tau_max default to tau
    ):
        assert softcse_loss(a, c, temperature=0.05, kernel=kernel, **kw)["loss"].item() == pytest.approx(
            base.item(), rel=1e-6), kw


def test_iftcl_without_twins_or_queue_is_mean_of_two_infonce():
    a, i, f = unit(5, 6, seed=16), unit(5, 6, seed=17), unit(5, 6, seed=18)
    out = iftcl_loss(a, i, f, twins_weight=0.0, temperature=0.05)
    expected = 0.5 * (infonce_loss(a, i)["loss"] + infonce_loss(a, f)["loss"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx(0.5 * (loop_loss(a, i, torch.arange(5), 0.05)
                                                      + loop_loss(a, f, torch.arange(5), 0.05)), rel=1e-12)


def test_twins_hinge_zero_inside_band():
    a = unit(3, 4, seed=19)
    # identical = anchors (s = 1); fraternal with s = 0.9 -> d = 0.1, inside [0, 0.2]
    ortho = F.normalize(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    ortho = F.normalize(ortho - (ortho * a).sum(1, keepdim=True) * a, dim=1)
    fraternal = 0.9 * a + math.sqrt(1 - 0.81) * ortho
    out = iftcl_loss(a, a.clone(), fraternal, margin_low=0.0, margin_high=0.2)
    assert out["margin"].item() == pytest.approx(0.1, abs=1e-12)
    assert out["twins"].item() == 0.0
    out = iftcl_loss(a, a.clone(), fraternal, margin_low=0.15, margin_high=0.2)
    assert out["twins"].item() == pytest.approx(0.05, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_infonce_and_exact_softcse_limits(kernel):
    a = unit(4, 5, seed=20).requires_grad_()
    c = unit(6, 5, seed=21).requires_grad_()
    pos = torch.tensor([2, 3, 4, 5])
    assert torch.autograd.gradcheck(
        lambda x, y: infonce_loss(x, y, temperature=0.1, positive_index=pos, kernel=kernel)["loss"], (a, c))
    assert torch.autograd.gradcheck(
        lambda x, y: softcse_loss(x, y, gamma=0.0, normalize_weights=True, positive_index=pos,
                                  kernel=kernel)["loss"], (a, c))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("contrastive", ["infonce", "softcse"])
def test_gradcheck_iftcl(kernel, contrastive):
    a = unit(3, 5, seed=22).requires_grad_()
    i = unit(3, 5, seed=23).requires_grad_()
    f = unit(3, 5, seed=24).requires_grad_()
    q = unit(2, 5, seed=25)
    extra = {"mode": "weight", "gamma": 0.0} if contrastive == "softcse" else {}
    assert torch.autograd.gradcheck(
        lambda x, y, z: iftcl_loss(x, y, z, queue=q, twins_weight=0.5, margin_low=0.0, margin_high=0.1,
                                   contrastive=contrastive, kernel=kernel, **extra)["loss"], (a, i, f))


FAMILIES = [
    {"mode": "weight", "gamma": 1.0},
    {"mode": "weight", "gamma": 3.0},
    {"mode": "temperature", "gamma": 1.0, "tau_min": 0.03, "tau_max": 0.2},
    {"mode": "temperature", "gamma": 2.0, "tau_min": 0.1, "tau_max": 0.02},
]


def _dense_kwargs(family):
    if family["mode"] == "weight":
        return {"weight_gamma": family["gamma"]}
    return {"tau_min": family["tau_min"], "tau_max": family["tau_max"], "tau_gamma": family["gamma"]}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_softcse_stop_gradient(kernel, family):
    """The gradient is that of the loss with w / tau_ij frozen: equal to autograd through the dense formula
    with detached weights, to central finite differences of that frozen surrogate, and NOT to the gradient
    of the fully differentiable formula."""
    a0, c0 = unit(5, 4, seed=26), unit(7, 4, seed=27)
    pos = torch.tensor([1, 2, 3, 4, 5])
    a, c = a0.clone().requires_grad_(), c0.clone().requires_grad_()
    softcse_loss(a, c, temperature=0.05, positive_index=pos, kernel=kernel, **family)["loss"].backward()

    ad, cd = a0.clone().requires_grad_(), c0.clone().requires_grad_()
    dense_detached(ad, cd, pos, 0.05, **_dense_kwargs(family)).backward()
    torch.testing.assert_close(a.grad, ad.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(c.grad, cd.grad, rtol=1e-9, atol=1e-10)

    # finite differences of the frozen-weight surrogate (no autograd involved)
    eps = 1e-6
    for x0, grad in ((a0, a.grad), (c0, c.grad)):
        num = torch.zeros_like(x0)
        for idx in range(x0.numel()):
            plus, minus = x0.clone(), x0.clone()
            plus.view(-1)[idx] += eps
            minus.view(-1)[idx] -= eps
            args_p = (plus, c0) if x0 is a0 else (a0, plus)
            args_m = (minus, c0) if x0 is a0 else (a0, minus)
            fp = dense_detached(*args_p, pos, 0.05, frozen_from=(a0, c0), **_dense_kwargs(family))
            fm = dense_detached(*args_m, pos, 0.05, frozen_from=(a0, c0), **_dense_kwargs(family))
            num.view(-1)[idx] = (fp - fm) / (2 * eps)
        torch.testing.assert_close(grad, num, rtol=1e-5, atol=1e-6)

    # the full derivative (weights differentiated) is different: the stop-gradient is real
    af, cf = a0.clone().requires_grad_(), c0.clone().requires_grad_()
    full = _dense_full(af, cf, pos, 0.05, **_dense_kwargs(family))
    full.backward()
    assert (af.grad - a.grad).abs().max() > 1e-3


def _dense_full(a, c, pos, tau, *, weight_gamma=0.0, tau_min=None, tau_max=None, tau_gamma=1.0):
    s = a @ c.T
    rows = torch.arange(a.shape[0])
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask[rows, pos] = True
    log_w = weight_gamma * torch.log((1 - s) / 2) if weight_gamma > 0 else torch.zeros_like(s)
    t = torch.full_like(s, tau) if tau_min is None else tau_min + (tau_max - tau_min) * ((1 + s) / 2) ** tau_gamma
    logits = torch.where(mask, s / tau, s / t + log_w)
    return (torch.logsumexp(logits, dim=1) - s[rows, pos] / tau).mean()


def test_normalize_weights_scale_is_stop_gradient():
    a0, c0 = unit(4, 6, seed=28), unit(4, 6, seed=29)
    a, c = a0.clone().requires_grad_(), c0.clone().requires_grad_()
    softcse_loss(a, c, gamma=2.0, normalize_weights=True)["loss"].backward()
    # same gradient as the dense formula with weights divided by their detached row mean
    ad, cd = a0.clone().requires_grad_(), c0.clone().requires_grad_()
    s = ad @ cd.T
    sg = s.detach()
    w = ((1 - sg) / 2) ** 2.0
    eye = torch.eye(4, dtype=torch.bool)
    w = w / w.masked_fill(eye, 0).sum(1, keepdim=True) * 3
    w = w.masked_fill(eye, 1.0)
    loss = (torch.logsumexp(s / 0.05 + w.log(), 1) - s.diagonal() / 0.05).mean()
    loss.backward()
    torch.testing.assert_close(a.grad, ad.grad)
    torch.testing.assert_close(c.grad, cd.grad)


def test_sharded_rows_equal_full_batch():
    """Mean of per-rank losses (local anchors vs all candidates, offset positives) == full-batch loss, and the
    summed per-rank gradients / world size == full-batch gradients (what DDP averaging computes)."""
    world, local = 3, 4
    a0, c0 = unit(world * local, 6, seed=30), unit(world * local, 6, seed=31)
    a, c = a0.clone().requires_grad_(), c0.clone().requires_grad_()
    full = softcse_loss(a, c, gamma=1.0)["loss"]
    full.backward()
    grads_a, grads_c, losses = torch.zeros_like(a0), torch.zeros_like(c0), []
    for rank in range(world):
        ar = a0[rank * local:(rank + 1) * local].clone().requires_grad_()
        cr = c0.clone().requires_grad_()
        loss = softcse_loss(ar, cr, gamma=1.0, positive_index=torch.arange(local) + rank * local)["loss"]
        loss.backward()
        losses.append(loss.item())
        grads_a[rank * local:(rank + 1) * local] += ar.grad
        grads_c += cr.grad
    assert sum(losses) / world == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(grads_a / world, a.grad)
    torch.testing.assert_close(grads_c / world, c.grad)


# ----------------------------------------------------------------------------------------------------------
# Numerics at the edges


def _extreme_inputs(dtype):
    a = unit(4, 8, seed=32)
    # candidates: the anchors (s_ii = +1), their negations (s = -1) and exact duplicates as negatives (s = +1)
    c = torch.cat([a, -a, a[[1, 0, 3, 2]]])
    return a.to(dtype), c.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kernel", KERNELS)
def test_no_nan_at_low_temperature_and_unit_similarities(dtype, kernel):
    a0, c0 = _extreme_inputs(dtype)
    calls = {
        "infonce": lambda a, c: infonce_loss(a, c, temperature=0.01, kernel=kernel),
        "weight": lambda a, c: softcse_loss(a, c, temperature=0.01, gamma=2.0, kernel=kernel),
        "weight_norm": lambda a, c: softcse_loss(a, c, temperature=0.01, gamma=2.0, normalize_weights=True,
                                                 kernel=kernel),
        "temperature": lambda a, c: softcse_loss(a, c, mode="temperature", temperature=0.01, tau_min=0.01,
                                                 tau_max=0.5, gamma=0.5, kernel=kernel),
        "iftcl": lambda a, c: iftcl_loss(a, c, c.flip(0), queue=c[:3].detach(), temperature=0.01,
                                         positive_index=torch.arange(4) + 8, kernel=kernel),
    }
    for name, fn in calls.items():
        a, c = a0.clone().requires_grad_(), c0.clone().requires_grad_()
        out = fn(a, c)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]), name
        assert all(torch.isfinite(v).all() for v in out.values()), name
        assert torch.isfinite(a.grad).all() and torch.isfinite(c.grad).all(), name


def test_duplicate_negative_weighs_zero():
    """A negative at s = +1 (a copy of the anchor) has weight ((1 - 1)/2)^gamma = 0: it drops out."""
    a, c = unit(1, 5, seed=33), unit(1, 5, seed=34)
    out = softcse_loss(a, torch.cat([c, a]), gamma=1.0)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-12)  # only the positive column is left
    assert infonce_loss(a, torch.cat([c, a]))["loss"].item() > 1.0


def test_low_precision_inputs_give_float32_loss():
    a, c = unit(4, 8, seed=35, dtype=torch.bfloat16), unit(4, 8, seed=36, dtype=torch.bfloat16)
    out = softcse_loss(a, c, gamma=1.0)
    assert out["loss"].dtype == torch.float32
    ref = loop_loss(a.double(), c.double(), torch.arange(4), 0.05, weight_gamma=1.0)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("call,match", [
    (lambda a, c: infonce_loss(a[0], c), "2-D"),
    (lambda a, c: infonce_loss(a, c[:, :3]), "dim mismatch"),
    (lambda a, c: infonce_loss(a, c[:2]), "at least N=4"),
    (lambda a, c: infonce_loss(a, c, positive_index=torch.tensor([0, 1])), "shape"),
    (lambda a, c: infonce_loss(a, c, positive_index=torch.tensor([0, 1, 2, 9])), "out of range"),
    (lambda a, c: infonce_loss(a, c, positive_index=torch.zeros(4)), "integer"),
    (lambda a, c: infonce_loss(a, c, temperature=0.0), "temperature"),
    (lambda a, c: infonce_loss(a, c, temperature=float("nan")), "temperature"),
    (lambda a, c: iftcl_loss(a, c, c, temperature=-1.0), "temperature"),
    (lambda a, c: infonce_loss(a, c, kernel="cuda"), "kernel"),
    (lambda a, c: infonce_loss(a, c.float()), "dtype"),
    (lambda a, c: infonce_loss(a, c, queue=torch.zeros(3, 2, dtype=torch.float64)), "queue"),
    (lambda a, c: softcse_loss(a, c, mode="both"), "mode"),
    (lambda a, c: softcse_loss(a, c, gamma=-1.0), "gamma"),
    (lambda a, c: softcse_loss(a, c, tau_min=0.1, tau_max=0.2), "mode='temperature' only"),
    (lambda a, c: softcse_loss(a, c, mode="temperature", normalize_weights=True), "mode='weight' only"),
    (lambda a, c: softcse_loss(a, c, mode="temperature", tau_min=-0.1), "tau_min"),
    (lambda a, c: iftcl_loss(a, c, c[:3]), "same rows"),
    (lambda a, c: iftcl_loss(a, c, c, margin_low=0.3, margin_high=0.2), "margin_low"),
    (lambda a, c: iftcl_loss(a, c, c, twins_weight=-1.0), "twins_weight"),
    (lambda a, c: iftcl_loss(a, c, c, contrastive="mse"), "contrastive"),
    (lambda a, c: iftcl_loss(a, c, c, gamma=2.0), "need contrastive"),
    (lambda a, c: iftcl_loss(a, c, c, contrastive="softcse", gamma=-2.0), "gamma"),
    (lambda a, c: iftcl_loss(a, c, c, margin_high=float("inf")), "margin_high"),
])
def test_bad_arguments_raise_value_error(call, match):
    a, c = unit(4, 5, seed=37), unit(4, 5, seed=38)
    with pytest.raises(ValueError, match=match):
        call(a, c)


def test_config_kernel_choices_are_the_kernels_backends():
    """LossConfig.kernel's Literal (trainer/config.py) must list exactly kernels.BACKENDS."""
    assert typing.get_args(typing.get_type_hints(LossConfig)["kernel"]) == kernels.BACKENDS


def test_losses_read_no_device_tensor_values():
    """On the meta device any read of tensor values (.item(), int(t), nonzero) raises: the losses check only
    scalars and shapes, so on a GPU a step costs no GPU->CPU sync (the old checks cost ~10 per IFTCL step)."""
    a = torch.randn(6, 8, device="meta", requires_grad=True)
    i = torch.randn(10, 8, device="meta", requires_grad=True)
    f = torch.randn(10, 8, device="meta", requires_grad=True)
    q, pos = torch.randn(4, 8, device="meta"), torch.arange(6, device="meta") + 2
    outs = [
        infonce_loss(a, i, positive_index=pos, queue=q),
        softcse_loss(a, i, gamma=2.0, normalize_weights=True, positive_index=pos, queue=q),
        softcse_loss(a, i, mode="temperature", tau_min=0.03, tau_max=0.2, positive_index=pos),
        iftcl_loss(a, i, f, queue=q, positive_index=pos, contrastive="softcse", gamma=1.0, normalize_weights=True),
    ]
    sum(out["loss"] for out in outs).backward()
    assert a.grad.shape == a.shape and i.grad.shape == i.shape and f.grad.shape == f.shape
