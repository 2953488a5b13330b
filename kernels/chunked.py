"""Memory-bounded pure-torch backend of the op (CPU / any device fallback), and ``mean_negative_weight``.

Same math as the other backends (spec in ``kernels/__init__.py``; the family from ``kernels/family.py``).
Legend: N rows (anchors), M columns (candidates), D dim, B column-block size.

Forward walks column blocks of B candidates, computes the N x B logits tile in fp32 (fp64 for fp64 inputs),
and merges each tile's row log-sum-exp into a running lse with ``logaddexp`` (exact for -inf terms, i.e.
zero weights). Only lse (N,) is saved. Backward recomputes every tile and its probabilities
``p_ij = exp(logit_ij - lse_i)`` and accumulates ``G_ij = g_i p_ij / tau_ij``, ``da += G @ c_B`` and
``dc_B = G^T @ a``. Peak extra memory is O(N x B + (N + M) x D), never O(N x M).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .family import (Exclude, Family, check_exclude, check_family, check_number, check_tensors,
                            excluded_mask, log_weight_inv_tau, negative_log_weight, positive_mask)

# A tile holds at most this many elements by default (2 MiB per fp32 temporary).
_TILE_ELEMENTS = 1 << 19


def default_block_size(num_rows: int, num_cols: int) -> int:
    """Column block so that an N x B tile stays near ``_TILE_ELEMENTS`` (a multiple of 16, >= 16)."""
    block = max(16, (_TILE_ELEMENTS // max(num_rows, 1)) // 16 * 16)
    return min(block, num_cols)


def _tile_logits(a_ND, c_BD, start, pos_idx_N, nls_N, family, exclude=None):
    """Return (logits_NB, 1/tau as an N x B tile or a scalar) for columns [start, start + B)."""
    logits_NB = a_ND @ c_BD.T
    log_w_NB, inv_tau = log_weight_inv_tau(logits_NB, family, pos_idx_N, start, nls_N, exclude)
    logits_NB.mul_(inv_tau)
    if log_w_NB is not None:
        logits_NB.add_(log_w_NB)
    return logits_NB, inv_tau


class _ChunkedSimSoftmaxLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, pos_idx_N, nls_N, block_size, family, exclude=None):
        compute_dtype = torch.promote_types(anchors.dtype, torch.float32)
        a_ND = anchors.detach().to(compute_dtype)
        c_MD = candidates.detach()
        if nls_N is not None:
            nls_N = nls_N.to(compute_dtype)
        lse_N = torch.full((a_ND.shape[0],), float("-inf"), dtype=compute_dtype, device=a_ND.device)
        for start in range(0, c_MD.shape[0], block_size):
            c_BD = c_MD[start:start + block_size].to(compute_dtype)
            logits_NB, _ = _tile_logits(a_ND, c_BD, start, pos_idx_N, nls_N, family, exclude)
            lse_N = torch.logaddexp(lse_N, torch.logsumexp(logits_NB, dim=1))
        ctx.save_for_backward(anchors, candidates, pos_idx_N, nls_N, lse_N)
        ctx.block_size, ctx.family, ctx.exclude = block_size, family, exclude
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        anchors, candidates, pos_idx_N, nls_N, lse_N = ctx.saved_tensors
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_da or need_dc):
            return None, None, None, None, None, None, None
        compute_dtype = lse_N.dtype
        a_ND = anchors.to(compute_dtype)
        grad_N1 = grad_lse_N.to(compute_dtype)[:, None]
        da_ND = torch.zeros_like(a_ND) if need_da else None
        dc_MD = torch.empty(candidates.shape, dtype=compute_dtype, device=a_ND.device) if need_dc else None
        for start in range(0, candidates.shape[0], ctx.block_size):
            c_BD = candidates[start:start + ctx.block_size].to(compute_dtype)
            logits_NB, inv_tau = _tile_logits(a_ND, c_BD, start, pos_idx_N, nls_N, ctx.family, ctx.exclude)
            # G_ij = g_i * p_ij / tau_ij; exp(-inf) = 0 for vanished (zero-weight) terms
            g_NB = logits_NB.sub_(lse_N[:, None]).exp_().mul_(grad_N1).mul_(inv_tau)
            if need_da:
                da_ND.addmm_(g_NB, c_BD)
            if need_dc:
                torch.mm(g_NB.T, a_ND, out=dc_MD[start:start + c_BD.shape[0]])
        da = da_ND.to(anchors.dtype) if need_da else None
        dc = dc_MD.to(candidates.dtype) if need_dc else None
        return da, dc, None, None, None, None, None


def chunked_lse(anchors: Tensor, candidates: Tensor, family: Family, positive_index_N: Tensor,
                neg_log_scale_N: Optional[Tensor], block_size: Optional[int] = None,
                exclude: Optional[Exclude] = None) -> Tensor:
    """lse (N,) from checked inputs (``check_family`` / ``check_tensors`` / ``check_exclude``); see the
    module docstring."""
    if block_size is None:
        block_size = default_block_size(anchors.shape[0], candidates.shape[0])
    return _ChunkedSimSoftmaxLSE.apply(anchors, candidates, positive_index_N, neg_log_scale_N, block_size,
                                       family, exclude)


def chunked_sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                            weight_gamma: float = 0.0, tau_min: Optional[float] = None,
                            tau_max: Optional[float] = None, tau_gamma: float = 1.0,
                            positive_index: Optional[Tensor] = None, neg_log_scale: Optional[Tensor] = None,
                            block_size: Optional[int] = None,
                            exclude: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Chunked-torch ``sim_softmax_lse``: (N,) lse, float32 (float64 for float64 inputs)."""
    family = check_family(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
                          tau_max=tau_max, tau_gamma=tau_gamma)
    positive_index, neg_log_scale = check_tensors(anchors, candidates, positive_index, neg_log_scale)
    keys = check_exclude(exclude, anchors.shape[0], candidates.shape[0], anchors.device)
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return chunked_lse(anchors, candidates, family, positive_index, neg_log_scale,
                       None if block_size is None else int(block_size), keys)


@torch.no_grad()
def mean_negative_weight(anchors: Tensor, candidates: Tensor, *, weight_gamma: float,
                         positive_index: Optional[Tensor] = None, block_size: int = 1024,
                         exclude: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Mean over negatives j != p(i) of w_ij = ((1 - s_ij)/2)^weight_gamma, (N,), memory O(N x block).

    Columns ``exclude`` leaves out of a row (see ``sim_softmax_lse``) are not negatives of it: they count
    neither in the sum nor in the number of negatives (a row left without negatives gets mean 0)."""
    weight_gamma = check_number(weight_gamma, "weight_gamma", minimum=0.0)
    positive_index, _ = check_tensors(anchors, candidates, positive_index)
    keys = check_exclude(exclude, anchors.shape[0], candidates.shape[0], anchors.device)
    n_rows, n_cols = anchors.shape[0], candidates.shape[0]
    if n_cols < 2:
        raise ValueError("mean_negative_weight needs at least 2 candidates (one positive, one negative)")
    compute_dtype = torch.promote_types(anchors.dtype, torch.float32)
    a_ND = anchors.to(compute_dtype)
    total_N = torch.zeros(n_rows, dtype=compute_dtype, device=anchors.device)
    count_N = torch.zeros(n_rows, dtype=compute_dtype, device=anchors.device) if keys is not None else None
    for start in range(0, n_cols, block_size):
        sim_NB = a_ND @ candidates[start:start + block_size].to(compute_dtype).T
        if weight_gamma > 0:
            w_NB = negative_log_weight(sim_NB.clamp_(-1.0, 1.0), weight_gamma).exp_()
        else:
            w_NB = torch.ones_like(sim_NB)
        # a mask, not an index of the positive columns: nonzero() would be a GPU->CPU sync per block
        off_NB = positive_mask(positive_index, start, sim_NB.shape[1])
        if keys is not None:
            off_NB |= excluded_mask(keys, start, sim_NB.shape[1])
            count_N += (~off_NB).sum(dim=1)
        total_N += w_NB.masked_fill_(off_NB, 0.0).sum(dim=1)
    if count_N is not None:
        return total_N / count_N.clamp_min(1.0)
    return total_N / (n_cols - 1)
