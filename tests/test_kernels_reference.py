"""The torch reference of ``kernels.sim_softmax_lse`` and the public functional's contract (CPU)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.sim_softmax import sim_softmax_lse_ref
from tests.test_kernels_helpers import (
    CASES,
    assert_close_scaled,
    case_kwargs,
    dense_lse_fp64,
    lse_and_grads,
    make_inputs,
)

N, M, D = 37, 53, 24


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_dense_fp64(case):
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs(case, N, M)
    grad = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(sim_softmax_lse_ref, a, c, grad, torch.float64, **kwargs)
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=1e-10, atol=1e-10, name=name)


@pytest.mark.parametrize("case", ["infonce", "infonce_perm_nls"])
def test_reference_gradcheck(case):
    # gradcheck differentiates everything, so only families whose w/tau do not depend on s qualify
    a, c = make_inputs(5, 8, 6, exact_pm1=False)
    kwargs = case_kwargs(case, 5, 8)
    a.requires_grad_(True)
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: sim_softmax_lse_ref(x, y, temperature=0.5, **kwargs), (a, c))


def test_exact_pm1_similarities_are_finite():
    a, c = make_inputs(N, M, D)
    sim = a @ c.T
    assert (sim == 1.0).any() and (sim == -1.0).any()
    for backend in ("reference", "chunked"):
        _, da, dc = lse_and_grads(kernels.sim_softmax_lse, a, c, torch.ones(N, dtype=torch.float64),
                                  torch.float32, weight_gamma=3.0, tau_min=0.02, tau_max=0.1, backend=backend)
        assert torch.isfinite(da).all() and torch.isfinite(dc).all()


def test_reference_upcast_false_keeps_float32():
    a, c = make_inputs(N, M, D)
    lse = sim_softmax_lse_ref(a.float(), c.float(), upcast=False)
    assert lse.dtype == torch.float32
    assert_close_scaled(lse, dense_lse_fp64(a.float(), c.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_functional_backends_agree_on_cpu(backend):
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs("weight_temp", N, M)
    lse = kernels.sim_softmax_lse(a.float(), c.float(), backend=backend, **kwargs)
    assert lse.shape == (N,) and lse.dtype == torch.float32
    assert_close_scaled(lse, dense_lse_fp64(a, c, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_gamma", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("permute", [False, True])
def test_mean_negative_weight(weight_gamma, permute):
    a, c = make_inputs(N, M, D)
    pos = torch.randperm(M, generator=torch.Generator().manual_seed(3))[:N] if permute else None
    got = kernels.mean_negative_weight(a, c, weight_gamma=weight_gamma, positive_index=pos, block_size=7)
    w = ((1.0 - (a @ c.T).clamp(-1, 1)) / 2.0) ** weight_gamma
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[torch.arange(N), torch.arange(N) if pos is None else pos] = False
    want = (w * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_neg_log_scale_renormalises_to_unit_mean_weight():
    # the loss's use: log w + neg_log_scale with scale = -log(mean w) makes negatives average weight 1
    a, c = make_inputs(N, M, D, exact_pm1=False)
    mean_w = kernels.mean_negative_weight(a, c, weight_gamma=2.0)
    lse = kernels.sim_softmax_lse(a, c, weight_gamma=2.0, neg_log_scale=-torch.log(mean_w), backend="reference")
    w = ((1.0 - (a @ c.T)) / 2.0) ** 2.0 / mean_w[:, None]
    w[torch.arange(N), torch.arange(N)] = 1.0
    torch.testing.assert_close(lse, torch.log((w * torch.exp((a @ c.T) / 0.05)).sum(1)))


def _bad_calls():
    a, c = make_inputs(6, 9, 4, exact_pm1=False)
    return {
        "unknown backend": (dict(a=a, c=c, backend="cuda-magic"), "unknown backend"),
        "1-D anchors": (dict(a=a[0], c=c), "2-D"),
        "D mismatch": (dict(a=a, c=c[:, :3]), "dim mismatch"),
        "M < N without positive_index": (dict(a=a, c=c[:4]), "M >= N"),
        "positive_index out of range": (dict(a=a, c=c, positive_index=torch.tensor([0, 1, 2, 3, 4, 9])),
                                        "out of range"),
        "negative positive_index": (dict(a=a, c=c, positive_index=torch.tensor([0, 1, 2, 3, 4, -1])),
                                    "out of range"),
        "positive_index shape": (dict(a=a, c=c, positive_index=torch.arange(5)), "shape"),
        "float positive_index": (dict(a=a, c=c, positive_index=torch.arange(6.0)), "integer"),
        "neg_log_scale shape": (dict(a=a, c=c, neg_log_scale=torch.zeros(5)), "neg_log_scale"),
        "tau_min alone": (dict(a=a, c=c, tau_min=0.1), "together"),
        "temperature <= 0": (dict(a=a, c=c, temperature=0.0), "temperature"),
        "dtype mismatch": (dict(a=a, c=c.float()), "dtype mismatch"),
    }


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("which", list(_bad_calls()))
def test_bad_inputs_raise_value_error(backend, which):
    kwargs, message = _bad_calls()[which]
    kwargs = dict(kwargs)
    a, c = kwargs.pop("a"), kwargs.pop("c")
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=message):
        kernels.sim_softmax_lse(a, c, **kwargs)
