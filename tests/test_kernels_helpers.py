"""Shared pieces of the kernel tests: an independent float64 dense formula, inputs, cases, comparisons.

The dense formula below is written from the spec (DESIGN.md "Kernel contract") with products
``w * exp(s / tau)`` instead of a log-sum-exp, so it shares no code with ``kernels``.
Legend: N rows (anchors), M columns (candidates), D dim.
"""

from __future__ import annotations

import torch

# Family configurations every backend is checked on (ids are pytest ids).
CASES = {
    "infonce": dict(),
    "weight": dict(weight_gamma=1.5),
    "temp": dict(tau_min=0.03, tau_max=0.2, tau_gamma=2.0),
    "weight_temp": dict(weight_gamma=2.0, tau_min=0.02, tau_max=0.1, tau_gamma=1.0),
    "weight1_temp07": dict(weight_gamma=1.0, tau_min=0.04, tau_max=0.3, tau_gamma=0.7),
    "perm_nls": dict(weight_gamma=0.5, permute=True, neg_log_scale=True),
    "infonce_perm_nls": dict(permute=True, neg_log_scale=True),
}


def dense_lse_fp64(a_ND, c_MD, *, temperature=0.05, weight_gamma=0.0, tau_min=None, tau_max=None,
                   tau_gamma=1.0, positive_index=None, neg_log_scale=None):
    """lse_i = log sum_j w_ij exp(s_ij / tau_ij) in float64, w and tau from the detached, clamped s."""
    sim_NM = a_ND.double() @ c_MD.double().T
    sim0_NM = sim_NM.detach().clamp(-1.0, 1.0)
    num_rows, num_cols = sim_NM.shape
    if positive_index is None:
        positive_index = torch.arange(num_rows, device=a_ND.device)
    is_pos_NM = torch.zeros(num_rows, num_cols, dtype=torch.bool, device=a_ND.device)
    is_pos_NM[torch.arange(num_rows, device=a_ND.device), positive_index.long()] = True
    w_NM = ((1.0 - sim0_NM) / 2.0) ** weight_gamma  # 0 ** 0 = 1
    if neg_log_scale is not None:
        w_NM = w_NM * torch.exp(neg_log_scale.double())[:, None]
    w_NM = torch.where(is_pos_NM, torch.ones_like(w_NM), w_NM)
    if tau_min is None:
        tau_NM = torch.full_like(sim0_NM, temperature)
    else:
        tau_NM = tau_min + (tau_max - tau_min) * ((1.0 + sim0_NM) / 2.0) ** tau_gamma
    tau_NM = torch.where(is_pos_NM, torch.full_like(tau_NM, temperature), tau_NM)
    return torch.log((w_NM * torch.exp(sim_NM / tau_NM)).sum(dim=1))


def make_inputs(num_rows=37, num_cols=53, dim=24, *, seed=0, device="cpu", exact_pm1=True):
    """Normalised float64 anchors/candidates (M >= N: rows N.. are queue columns).

    With ``exact_pm1`` some rows are one-hot vectors whose positive, a negative duplicate and a negated copy
    sit among the candidates, so similarities of exactly +1 and -1 occur (in every dtype).
    """
    gen = torch.Generator().manual_seed(seed)
    a_ND = torch.nn.functional.normalize(torch.randn(num_rows, dim, generator=gen, dtype=torch.float64), dim=1)
    c_MD = torch.nn.functional.normalize(torch.randn(num_cols, dim, generator=gen, dtype=torch.float64), dim=1)
    c_MD[: min(num_rows, num_cols) // 2] = a_ND[: min(num_rows, num_cols) // 2] * 0.8 + 0.2 * c_MD[
        : min(num_rows, num_cols) // 2]  # positives close to their anchors
    c_MD = torch.nn.functional.normalize(c_MD, dim=1)
    if exact_pm1 and num_rows >= 4 and num_cols >= num_rows + 3:
        eye = torch.eye(dim, dtype=torch.float64)
        a_ND[0], a_ND[1] = eye[0], eye[1]
        c_MD[0] = eye[0]  # positive of row 0: s = +1
        c_MD[2] = eye[0]  # a negative of row 0 with s = +1 (zero weight when weight_gamma > 0)
        c_MD[num_rows] = -eye[1]  # a queue column with s = -1 for row 1
        c_MD[num_rows + 1] = eye[1]  # a queue column with s = +1 for row 1
        a_ND[3] = a_ND[2]  # duplicate anchor rows
    return a_ND.to(device), c_MD.to(device)


def case_kwargs(case: str, num_rows: int, num_cols: int, *, seed=0, device="cpu") -> dict:
    """Keyword arguments of a CASES entry, with tensors materialised (float64 neg_log_scale)."""
    spec = dict(CASES[case])
    gen = torch.Generator().manual_seed(seed + 1)
    if spec.pop("permute", False):
        spec["positive_index"] = torch.randperm(num_cols, generator=gen)[:num_rows].to(device)
    if spec.pop("neg_log_scale", False):
        spec["neg_log_scale"] = (0.3 * torch.randn(num_rows, generator=gen, dtype=torch.float64)).to(device)
    return spec


def lse_and_grads(fn, a_ND, c_MD, grad_N, dtype, **kwargs):
    """Run ``fn`` on copies of the inputs in ``dtype``; return (lse, da, dc) of sum(grad * lse)."""
    a = a_ND.detach().to(dtype).requires_grad_(True)
    c = c_MD.detach().to(dtype).requires_grad_(True)
    lse = fn(a, c, **kwargs)
    da, dc = torch.autograd.grad((lse * grad_N.to(lse.dtype)).sum(), (a, c))
    return lse.detach(), da, dc


def assert_close_scaled(actual, expected, *, rtol, atol, name=""):
    """|actual - expected| <= atol * max|expected| + rtol * |expected| elementwise (float64 compare)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    worst = (err - bound).max()
    assert worst <= 0, f"{name}: max err {err.max().item():.3g} exceeds bound (scale {scale.item():.3g})"
