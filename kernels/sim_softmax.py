"""Similarity log-sum-exp over candidates: spec, torch reference and dispatching functional.

Spec (legend: N anchors/rows, M candidates/columns, D embedding dim; inputs already L2-normalised)::

    s_ij   = <a_i, c_j>
    lse_i  = log sum_j w_ij * exp(s_ij / tau_ij)

Weights and temperatures are computed from the stop-gradient similarity ``sg(s_ij)`` clamped to [-1, 1]:

    w_ij   = ((1 - sg(s_ij)) / 2) ** weight_gamma                     (weight_gamma = 0 -> 1)
    tau_ij = temperature                                              (tau_min/tau_max None)
           = tau_min + (tau_max - tau_min) * ((1 + sg(s_ij)) / 2) ** tau_gamma

The positive column j = p(i) (``positive_index``, default arange(N)) always has weight 1 and temperature
``temperature``. ``neg_log_scale`` (N,) is added to log w_ij of every negative column of row i. Both are
constants for autograd; gradients flow through s_ij only (d(s/tau)/ds = 1/tau).
At s_ij = 1 and weight_gamma > 0, log w_ij = -inf: the term vanishes (zero probability, zero gradient).

Returned lse is float32 for fp16/bf16/fp32 inputs and float64 for float64 inputs; input gradients have the
input dtype.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "chunked", "reference")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (does not import it)."""
    return importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------------------------------------
# Input checking shared by every backend
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(anchors, candidates, *, temperature, weight_gamma, tau_min, tau_max, tau_gamma,
                  positive_index, neg_log_scale, check_range=True):
    """Validate shapes and hyper-parameters; return (positive_index, neg_log_scale) materialised."""
    if not isinstance(anchors, Tensor) or not isinstance(candidates, Tensor):
        raise ValueError("anchors and candidates must be torch.Tensor")
    if anchors.dim() != 2 or candidates.dim() != 2:
        raise ValueError(f"anchors and candidates must be 2-D (N x D, M x D); got shapes "
                         f"{tuple(anchors.shape)} and {tuple(candidates.shape)}")
    n_rows, dim = anchors.shape
    n_cols, dim_c = candidates.shape
    if dim != dim_c:
        raise ValueError(f"embedding dim mismatch: anchors have D={dim}, candidates D={dim_c}")
    if n_rows == 0 or n_cols == 0 or dim == 0:
        raise ValueError(f"empty input: N={n_rows}, M={n_cols}, D={dim}")
    if anchors.device != candidates.device:
        raise ValueError(f"anchors on {anchors.device} but candidates on {candidates.device}")
    if anchors.dtype != candidates.dtype:
        raise ValueError(f"dtype mismatch: anchors {anchors.dtype}, candidates {candidates.dtype}")
    if not anchors.dtype.is_floating_point:
        raise ValueError(f"anchors must be floating point, got {anchors.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight_gamma < 0:
        raise ValueError(f"weight_gamma must be >= 0, got {weight_gamma}")
    if (tau_min is None) != (tau_max is None):
        raise ValueError("tau_min and tau_max must be given together (or both None)")
    if tau_min is not None:
        if not (tau_min > 0 and tau_max > 0):
            raise ValueError(f"tau_min and tau_max must be > 0, got {tau_min}, {tau_max}")
        if not tau_gamma > 0:
            raise ValueError(f"tau_gamma must be > 0, got {tau_gamma}")
    if positive_index is None:
        if n_cols < n_rows:
            raise ValueError(f"positive_index defaults to arange(N) which needs M >= N; got N={n_rows}, "
                             f"M={n_cols}")
        positive_index = torch.arange(n_rows, device=anchors.device)
    else:
        if not isinstance(positive_index, Tensor) or positive_index.dtype.is_floating_point \
                or positive_index.dtype == torch.bool:
            raise ValueError("positive_index must be an integer tensor")
        if positive_index.shape != (n_rows,):
            raise ValueError(f"positive_index must have shape (N,)=({n_rows},), got "
                             f"{tuple(positive_index.shape)}")
        positive_index = positive_index.to(device=anchors.device, dtype=torch.long)
        if check_range:
            lo, hi = int(positive_index.min()), int(positive_index.max())
            if lo < 0 or hi >= n_cols:
                raise ValueError(f"positive_index out of range [0, {n_cols}): min {lo}, max {hi}")
    if neg_log_scale is not None:
        if not isinstance(neg_log_scale, Tensor) or neg_log_scale.shape != (n_rows,):
            raise ValueError(f"neg_log_scale must be a tensor of shape (N,)=({n_rows},)")
        neg_log_scale = neg_log_scale.detach().to(device=anchors.device, dtype=torch.float32)
    return positive_index, neg_log_scale


def _log_weight_and_inv_tau(sim, *, temperature, weight_gamma, tau_min, tau_max, tau_gamma):
    """log w and 1/tau of the family from a (detached) similarity tile; negatives' values (no positive fix)."""
    sg = sim.detach().clamp(-1.0, 1.0)
    if weight_gamma > 0:
        # (1 - s)/2 may be exactly 0 -> log 0 = -inf; gamma * -inf = -inf (gamma > 0): the term vanishes.
        log_w = weight_gamma * torch.log((1.0 - sg) * 0.5)
    else:
        log_w = torch.zeros_like(sg)
    if tau_min is None:
        inv_tau = torch.full_like(sg, 1.0 / temperature)
    else:
        inv_tau = 1.0 / (tau_min + (tau_max - tau_min) * ((1.0 + sg) * 0.5) ** tau_gamma)
    return log_w, inv_tau


# ----------------------------------------------------------------------------------------------------------
# Reference (dense N x M; tests, benchmarks and the simplest backend)
# ----------------------------------------------------------------------------------------------------------
def sim_softmax_lse_ref(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                        weight_gamma: float = 0.0, tau_min: float | None = None, tau_max: float | None = None,
                        tau_gamma: float = 1.0, positive_index: Tensor | None = None,
                        neg_log_scale: Tensor | None = None, upcast: bool = True) -> Tensor:
    """Dense torch reference. ``upcast=True`` computes in float64; else in promote(dtype, float32)."""
    positive_index, neg_log_scale = _check_inputs(
        anchors, candidates, temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
        tau_max=tau_max, tau_gamma=tau_gamma, positive_index=positive_index, neg_log_scale=neg_log_scale)
    out_dtype = torch.promote_types(anchors.dtype, torch.float32)
    compute_dtype = torch.float64 if upcast else out_dtype
    sim_NM = anchors.to(compute_dtype) @ candidates.to(compute_dtype).T
    log_w_NM, inv_tau_NM = _log_weight_and_inv_tau(
        sim_NM, temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min, tau_max=tau_max,
        tau_gamma=tau_gamma)
    if neg_log_scale is not None:
        log_w_NM = log_w_NM + neg_log_scale.to(compute_dtype)[:, None]
    rows = torch.arange(sim_NM.shape[0], device=sim_NM.device)
    log_w_NM[rows, positive_index] = 0.0
    inv_tau_NM[rows, positive_index] = 1.0 / temperature
    lse_N = torch.logsumexp(sim_NM * inv_tau_NM + log_w_NM, dim=1)
    return lse_N.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, anchors: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if anchors.is_cuda and triton_available() else "chunked"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but triton is not installed")
        if not anchors.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    return backend


def sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                    weight_gamma: float = 0.0, tau_min: float | None = None, tau_max: float | None = None,
                    tau_gamma: float = 1.0, positive_index: Tensor | None = None,
                    neg_log_scale: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Per-row ``lse_i = log sum_j w_ij exp(s_ij / tau_ij)`` (N,), differentiable in both inputs.

    See the module docstring for the math. ``backend``: "auto" (Triton on CUDA when importable, else
    "chunked"), "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "chunked", "reference".
    """
    resolved = _resolve_backend(backend, anchors)
    kwargs = dict(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min, tau_max=tau_max,
                  tau_gamma=tau_gamma, positive_index=positive_index, neg_log_scale=neg_log_scale)
    if resolved == "reference":
        return sim_softmax_lse_ref(anchors, candidates, upcast=False, **kwargs)
    if resolved == "chunked":
        from kernels.chunked import chunked_sim_softmax_lse  # lazy: chunked imports this module

        return chunked_sim_softmax_lse(anchors, candidates, **kwargs)
    # Triton path lands in STEP 3; until then it routes to the chunked backend.
    from kernels.chunked import chunked_sim_softmax_lse

    return chunked_sim_softmax_lse(anchors, candidates, **kwargs)


@torch.no_grad()
def mean_negative_weight(anchors: Tensor, candidates: Tensor, *, weight_gamma: float,
                         positive_index: Tensor | None = None, block_size: int = 1024) -> Tensor:
    """Mean over negatives j != p(i) of w_ij = ((1 - s_ij)/2)^weight_gamma, (N,), memory O(N x block)."""
    positive_index, _ = _check_inputs(
        anchors, candidates, temperature=1.0, weight_gamma=weight_gamma, tau_min=None, tau_max=None,
        tau_gamma=1.0, positive_index=positive_index, neg_log_scale=None)
    n_rows, n_cols = anchors.shape[0], candidates.shape[0]
    if n_cols < 2:
        raise ValueError("mean_negative_weight needs at least 2 candidates (one positive, one negative)")
    compute_dtype = torch.promote_types(anchors.dtype, torch.float32)
    a_ND = anchors.to(compute_dtype)
    total_N = torch.zeros(n_rows, dtype=compute_dtype, device=anchors.device)
    for start in range(0, n_cols, block_size):
        c_BD = candidates[start:start + block_size].to(compute_dtype)
        sim_NB = a_ND @ c_BD.T
        w_NB = ((1.0 - sim_NB.clamp(-1.0, 1.0)) * 0.5) ** weight_gamma if weight_gamma > 0 \
            else torch.ones_like(sim_NB)
        # zero the positive column when it falls inside this block
        cols = positive_index - start
        in_block = (cols >= 0) & (cols < c_BD.shape[0])
        rows = torch.nonzero(in_block).squeeze(1)
        w_NB[rows, cols[rows]] = 0.0
        total_N += w_NB.sum(dim=1)
    return total_N / (n_cols - 1)
