"""Pure-torch backend of the op (CPU / any device fallback), and ``mean_negative_weight``.

Same math as the other backends (spec in ``kernels/__init__.py``; the family from ``kernels/family.py``).
Legend: N rows (anchors), M columns (candidates), D dim, B column-block size, R row-stripe size.

Two paths, chosen per call (``chunked_lse``):

- kept (CPU tensors whose N x M compute-dtype matrix fits ``workspace_bytes``): one GEMM writes the N x M
  logits into the workspace, the family is applied in row stripes of R rows (temporaries O(R x M), within
  what the workspace has left beyond the matrix, at least ``_TILE_ELEMENTS``), and a row softmax runs IN
  PLACE, so the workspace ends up holding ``H = p`` (``p / tau`` when tau varies).
  lse comes from the positive column, which always has weight 1: ``lse_i = z_ip - log p_ip``, exact as long
  as p_ip is a normal number (rows where it is not, i.e. hopeless positives, are recomputed). Backward is
  two GEMMs with the row factor r = g (/ temperature) folded into N x D operands, never into H:
  ``da = r * (H C)``, ``dc = H^T (r * A)``. 6NMD FLOPs, one exp per element, nothing recomputed.
- recompute (otherwise): forward walks column blocks of B candidates, computes the N x B logits tile in
  fp32 (fp64 for fp64 inputs), and merges each tile's row log-sum-exp into a running lse with ``logaddexp``
  (exact for -inf terms, i.e. zero weights). Only lse (N,) is saved. Backward recomputes every tile and
  its probabilities ``p_ij = exp(logit_ij - lse_i)`` and accumulates ``G_ij = g_i p_ij / tau_ij``,
  ``da += G @ c_B`` and ``dc_B = G^T @ a``. 8NMD FLOPs; peak extra memory O(N x B + (N + M) x D).

Plain InfoNCE (one temperature, no weights, no ``neg_log_scale``) builds no positive mask on either path:
1/temperature is folded into A (kept) or applied as a scalar (recompute).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .family import (DEFAULT_WORKSPACE_BYTES, Exclude, Family, check_exclude, check_family, check_number,
                     check_tensors, check_workspace, excluded_mask, is_plain, log_weight_inv_tau,
                     negative_log_weight, positive_mask)

# A tile (or a row stripe of the kept path) holds at most this many elements by default (2 MiB per fp32
# temporary): small enough for the stripe's softmax passes to stay in the CPU's L2/L3 cache.
_TILE_ELEMENTS = 1 << 19


def default_block_size(num_rows: int, num_cols: int) -> int:
    """Column block so that an N x B tile stays near ``_TILE_ELEMENTS`` (a multiple of 16, >= 16)."""
    block = max(16, (_TILE_ELEMENTS // max(num_rows, 1)) // 16 * 16)
    return min(block, num_cols)


def keeps_logits(anchors: Tensor, candidates: Tensor, workspace_bytes: int) -> bool:
    """True when ``chunked_lse`` takes the kept path: CPU tensors and N x M x itemsize <= workspace_bytes.

    CPU only: the kept forward reads p_ip on the host to find rows that need recomputing, a sync that a GPU
    training step must not pay (GPUs have the Triton backend).
    """
    itemsize = torch.promote_types(anchors.dtype, torch.float32).itemsize
    return (anchors.device.type == "cpu"
            and anchors.shape[0] * candidates.shape[0] * itemsize <= workspace_bytes)


def _tile_logits(a_ND, c_BD, start, pos_idx_N, nls_N, family, exclude=None):
    """Return (logits_NB, 1/tau as an N x B tile or a scalar) for columns [start, start + B)."""
    logits_NB = a_ND @ c_BD.T
    log_w_NB, inv_tau = log_weight_inv_tau(logits_NB, family, pos_idx_N, start, nls_N, exclude)
    logits_NB.mul_(inv_tau)
    if log_w_NB is not None:
        logits_NB.add_(log_w_NB)
    return logits_NB, inv_tau


def _softmax_rows_lse(z_RM: Tensor, pos_R1: Tensor) -> Tensor:
    """Softmax of the logits rows IN PLACE; returns lse from the positive column (NaN where p_ip is not
    a comfortably normal number, for the caller to recompute)."""
    z_pos_R = z_RM.gather(1, pos_R1).squeeze(1)
    torch.softmax(z_RM, 1, out=z_RM)
    p_pos_R = z_RM.gather(1, pos_R1).squeeze(1)
    tiny = torch.finfo(z_RM.dtype).tiny ** 0.5  # p >= sqrt(tiny): exp(z - max) was normal, log(p) accurate
    return torch.where(p_pos_R >= tiny, z_pos_R - torch.log(p_pos_R), float("nan"))


def _kept_forward(a_ND, c_MD, pos_N, nls_N, family, stripe_rows):
    """(H_NM, lse_N, scale): H = p (scale = 1/temperature) or p / tau (scale = 1); see the docstring."""
    n_rows, n_cols = a_ND.shape[0], c_MD.shape[0]
    inv_temp = 1.0 / family.temperature
    if is_plain(family, nls_N):  # logits straight out of the GEMM: 1/temperature folded into A
        h_NM = torch.mm(a_ND * inv_temp, c_MD.T)
        lse_N = _softmax_rows_lse(h_NM, pos_N[:, None])
        scale = inv_temp
    else:
        h_NM = torch.mm(a_ND, c_MD.T)
        lse_N = torch.empty(n_rows, dtype=a_ND.dtype)
        scale = inv_temp if family.tau_min is None else 1.0
        for r0 in range(0, n_rows, stripe_rows):
            rows = slice(r0, r0 + stripe_rows)
            nls_R = None if nls_N is None else nls_N[rows]
            z_RM = h_NM[rows]  # a contiguous view: the family and the softmax work in place
            log_w_RM, inv_tau = log_weight_inv_tau(z_RM, family, pos_N[rows], 0, nls_R)
            z_RM.mul_(inv_tau)
            if log_w_RM is not None:
                z_RM.add_(log_w_RM)
            del log_w_RM
            lse_N[rows] = _softmax_rows_lse(z_RM, pos_N[rows, None])
            if isinstance(inv_tau, Tensor):
                z_RM.mul_(inv_tau)
    bad = torch.isnan(lse_N).nonzero().squeeze(1)  # host read: CPU only (keeps_logits)
    if bad.numel():  # positives with p < sqrt(tiny): their lse from the row itself
        nls_bad = None if nls_N is None else nls_N[bad]
        logits, _ = _tile_logits(a_ND[bad], c_MD, 0, pos_N[bad], nls_bad, family)
        lse_N[bad] = torch.logsumexp(logits, dim=1)
    return h_NM, lse_N, scale


class _KeptSimSoftmaxLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, pos_idx_N, nls_N, stripe_rows, family):
        compute_dtype = torch.promote_types(anchors.dtype, torch.float32)
        a_ND = anchors.detach().to(compute_dtype)
        c_MD = candidates.detach().to(compute_dtype)
        if nls_N is not None:
            nls_N = nls_N.to(compute_dtype)
        h_NM, lse_N, scale = _kept_forward(a_ND, c_MD, pos_idx_N, nls_N, family, stripe_rows)
        ctx.save_for_backward(anchors, candidates, h_NM)
        ctx.scale = scale
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        anchors, candidates, h_NM = ctx.saved_tensors
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # G = r_i H_ij with r = g (/ temperature): r scales N x D operands, H is read-only (retain_graph)
        r_N1 = (grad_lse_N.to(h_NM.dtype) * ctx.scale)[:, None]
        da = dc = None
        if need_da:
            da = torch.mm(h_NM, candidates.to(h_NM.dtype)).mul_(r_N1).to(anchors.dtype)
        if need_dc:
            dc = torch.mm(h_NM.T, anchors.to(h_NM.dtype) * r_N1).to(candidates.dtype)
        return da, dc, None, None, None, None


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
                exclude: Optional[Exclude] = None, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> Tensor:
    """lse (N,) from checked inputs (``check_family`` / ``check_tensors`` / ``check_exclude``); see the
    module docstring.

    ``block_size``: columns per tile of the recompute path, rows per stripe of the kept path (default:
    tiles of about ``_TILE_ELEMENTS``). ``workspace_bytes``: the kept path's budget (0 = always recompute).
    """
    n_rows, n_cols = anchors.shape[0], candidates.shape[0]
    if exclude is None and keeps_logits(anchors, candidates, workspace_bytes):  # the kept path takes no keys
        # the family's temporaries (about 3 per element: the clamped copy / log w, 1/tau, the bool mask)
        # take what the workspace has left beyond the kept matrix: fewer, larger stripes mean fewer torch
        # calls, each a thread-pool barrier that other load on the cores makes expensive
        itemsize = torch.promote_types(anchors.dtype, torch.float32).itemsize
        spare_rows = (workspace_bytes - n_rows * n_cols * itemsize) // (3 * n_cols * itemsize)
        stripe_rows = block_size or max(1, _TILE_ELEMENTS // n_cols, spare_rows)
        return _KeptSimSoftmaxLSE.apply(anchors, candidates, positive_index_N, neg_log_scale_N, stripe_rows,
                                        family)
    if block_size is None:
        block_size = default_block_size(n_rows, n_cols)
    return _ChunkedSimSoftmaxLSE.apply(anchors, candidates, positive_index_N, neg_log_scale_N, block_size,
                                       family, exclude)


def chunked_sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                            weight_gamma: float = 0.0, tau_min: Optional[float] = None,
                            tau_max: Optional[float] = None, tau_gamma: float = 1.0,
                            positive_index: Optional[Tensor] = None, neg_log_scale: Optional[Tensor] = None,
                            block_size: Optional[int] = None, workspace_bytes: Optional[int] = None,
                            exclude: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Chunked-torch ``sim_softmax_lse``: (N,) lse, float32 (float64 for float64 inputs).

    ``workspace_bytes`` (None = ``DEFAULT_WORKSPACE_BYTES``; 0 = never keep the logits) bounds the kept
    path's N x M buffer; ``block_size`` as in ``chunked_lse``.
    """
    family = check_family(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
                          tau_max=tau_max, tau_gamma=tau_gamma)
    positive_index, neg_log_scale = check_tensors(anchors, candidates, positive_index, neg_log_scale)
    keys = check_exclude(exclude, anchors.shape[0], candidates.shape[0], anchors.device)
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return chunked_lse(anchors, candidates, family, positive_index, neg_log_scale,
                       None if block_size is None else int(block_size), keys, check_workspace(workspace_bytes))


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
