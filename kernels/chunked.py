"""Memory-bounded pure-torch backend of ``sim_softmax_lse`` (CPU / any device fallback).

Same math and signature as ``kernels.sim_softmax.sim_softmax_lse`` (spec in that module's docstring).
Legend: N rows (anchors), M columns (candidates), D dim, B column-block size.

Forward walks column blocks of B candidates, computes the N x B logits tile in fp32 (fp64 for fp64 inputs),
and merges each tile's row log-sum-exp into a running lse with ``logaddexp`` (exact for -inf terms, i.e.
zero weights). Only lse (N,) is saved. Backward recomputes every tile and its probabilities
``p_ij = exp(logit_ij - lse_i)`` and accumulates ``G_ij = g_i p_ij / tau_ij``, ``da += G @ c_B`` and
``dc_B = G^T @ a``. Peak extra memory is O(N x B + (N + M) x D), never O(N x M).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.sim_softmax import _check_inputs

# A tile holds at most this many elements by default (2 MiB per fp32 temporary).
_TILE_ELEMENTS = 1 << 19


def default_block_size(num_rows: int, num_cols: int) -> int:
    """Column block so that an N x B tile stays near ``_TILE_ELEMENTS`` (a multiple of 16, >= 16)."""
    block = max(16, (_TILE_ELEMENTS // max(num_rows, 1)) // 16 * 16)
    return min(block, num_cols)


def _tile_logits(a_ND, c_BD, start, pos_idx_N, nls_N, hp):
    """Return (logits_NB, 1/tau as an N x B tile or a scalar) for columns [start, start + B).

    In-place arithmetic keeps about three N x B tiles alive (sim/logits, weights, 1/tau).
    """
    temperature, weight_gamma, tau_min, tau_max, tau_gamma = hp
    logits_NB = a_ND @ c_BD.T
    cols_B = torch.arange(start, start + c_BD.shape[0], device=a_ND.device)
    is_pos_NB = pos_idx_N[:, None] == cols_B[None, :]
    inv_tau = 1.0 / temperature
    if tau_min is not None or weight_gamma > 0:
        sg_NB = logits_NB.clamp(-1.0, 1.0)  # stop-gradient s (no autograd here) clamped for w and tau
        if tau_min is not None:
            inv_tau = (sg_NB + 1.0).mul_(0.5).pow_(tau_gamma).mul_(tau_max - tau_min).add_(tau_min)
            inv_tau = inv_tau.reciprocal_().masked_fill_(is_pos_NB, 1.0 / temperature)
        log_w_NB = None
        if weight_gamma > 0:
            # (1 - s)/2 = 0 at s = 1 -> log 0 = -inf: exp gives 0, the term vanishes
            log_w_NB = sg_NB.neg_().add_(1.0).mul_(0.5).log_().mul_(weight_gamma)
        del sg_NB
    else:
        log_w_NB = None
    logits_NB.mul_(inv_tau)
    if nls_N is not None:
        log_w_NB = nls_N[:, None].expand_as(logits_NB) if log_w_NB is None else log_w_NB.add_(nls_N[:, None])
        log_w_NB = log_w_NB.masked_fill(is_pos_NB, 0.0)  # positive column: weight 1
    elif log_w_NB is not None:
        log_w_NB.masked_fill_(is_pos_NB, 0.0)
    if log_w_NB is not None:
        logits_NB.add_(log_w_NB)
    return logits_NB, inv_tau


class _ChunkedSimSoftmaxLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, pos_idx_N, nls_N, block_size, hp):
        compute_dtype = torch.promote_types(anchors.dtype, torch.float32)
        a_ND = anchors.detach().to(compute_dtype)
        c_MD = candidates.detach()
        if nls_N is not None:
            nls_N = nls_N.to(compute_dtype)
        lse_N = torch.full((a_ND.shape[0],), float("-inf"), dtype=compute_dtype, device=a_ND.device)
        for start in range(0, c_MD.shape[0], block_size):
            c_BD = c_MD[start:start + block_size].to(compute_dtype)
            logits_NB, _ = _tile_logits(a_ND, c_BD, start, pos_idx_N, nls_N, hp)
            lse_N = torch.logaddexp(lse_N, torch.logsumexp(logits_NB, dim=1))
        ctx.save_for_backward(anchors, candidates, pos_idx_N, nls_N, lse_N)
        ctx.block_size, ctx.hp = block_size, hp
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        anchors, candidates, pos_idx_N, nls_N, lse_N = ctx.saved_tensors
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_da or need_dc):
            return None, None, None, None, None, None
        compute_dtype = lse_N.dtype
        a_ND = anchors.to(compute_dtype)
        grad_N1 = grad_lse_N.to(compute_dtype)[:, None]
        da_ND = torch.zeros_like(a_ND) if need_da else None
        dc_MD = torch.empty(candidates.shape, dtype=compute_dtype, device=a_ND.device) if need_dc else None
        for start in range(0, candidates.shape[0], ctx.block_size):
            c_BD = candidates[start:start + ctx.block_size].to(compute_dtype)
            logits_NB, inv_tau = _tile_logits(a_ND, c_BD, start, pos_idx_N, nls_N, ctx.hp)
            # G_ij = g_i * p_ij / tau_ij; exp(-inf) = 0 for vanished (zero-weight) terms
            g_NB = logits_NB.sub_(lse_N[:, None]).exp_().mul_(grad_N1).mul_(inv_tau)
            if need_da:
                da_ND.addmm_(g_NB, c_BD)
            if need_dc:
                torch.mm(g_NB.T, a_ND, out=dc_MD[start:start + c_BD.shape[0]])
        da = da_ND.to(anchors.dtype) if need_da else None
        dc = dc_MD.to(candidates.dtype) if need_dc else None
        return da, dc, None, None, None, None


def chunked_sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                            weight_gamma: float = 0.0, tau_min: float | None = None,
                            tau_max: float | None = None, tau_gamma: float = 1.0,
                            positive_index: Tensor | None = None, neg_log_scale: Tensor | None = None,
                            block_size: int | None = None) -> Tensor:
    """Chunked-torch ``sim_softmax_lse``: (N,) lse, float32 (float64 for float64 inputs)."""
    pos_idx_N, nls_N = _check_inputs(
        anchors, candidates, temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
        tau_max=tau_max, tau_gamma=tau_gamma, positive_index=positive_index, neg_log_scale=neg_log_scale)
    if block_size is None:
        block_size = default_block_size(anchors.shape[0], candidates.shape[0])
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hp = (float(temperature), float(weight_gamma), None if tau_min is None else float(tau_min),
          None if tau_max is None else float(tau_max), float(tau_gamma))
    return _ChunkedSimSoftmaxLSE.apply(anchors, candidates, pos_idx_N, nls_N, int(block_size), hp)
