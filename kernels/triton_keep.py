"""Triton keep paths (kernel v2): gradient tiles come out of the forward instead of being recomputed.

Spec in ``kernels/__init__.py``; the kernels (``fwd_keep_kernel``, ``keep_fixup_kernel``) and their
numerics in ``kernels/triton_kernels.py``. Legend: N rows, M columns, D dim, R rows of a stripe, S column
splits of the keep kernel.

The keep kernel computes each similarity tile once (2NMD), folds it into the row's lse and stores
P_ij = wf_ij tau_min / tau_ij 2^(z2_ij - ref_is) (input dtype: bf16/fp16/fp32) for a stripe of rows. Since
G_ij = g_i p_ij / tau_ij = g_i f_is P_ij with a per-(split, row) factor f, the two products are cuBLAS
GEMMs on P with the factor folded into N x D operands, never into P: da = sum_s f_s g * (P_s C_s),
dc_s = P_s^T (f_s g * A). Total 6NMD FLOPs instead of 8NMD (forward 2 + recomputed S 2 + two GEMMs 4).

- "keep" (reduction "none"): N x M x itemsize fits ``workspace_bytes``; P lives until the backward, which
  applies the upstream grad g (any g: it is a row factor).
- "fwdgrad" (reduction "mean"/"sum", the Liger fused-linear-cross-entropy trick): the upstream grad of a
  mean/sum is the same scalar for every row, so the gradients are computed in the forward, stripe of rows
  by stripe (R = workspace / (M x itemsize)), da complete per stripe, dc accumulated in fp32; the backward
  multiplies them by the incoming scalar. The workspace is reused by every stripe.
- "recompute" otherwise (``kernels/triton_op.py``), and automatically where D <= 256 (the fused recompute
  backward moves no N x M data at all) or when no input needs a gradient.
fp16 products: the row factor is split into max|f g| (an fp32 scalar applied to the fp32 product) and a
ratio <= 1 applied to A, so that the fp16 operand never underflows (g = 1/N is tiny).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .triton_kernels import fwd_keep_kernel, keep_fixup_kernel
from .triton_launch import (LN2, LOG2E, COMPILED, choose_splits, device_of, dot_flags, hyper_args,
                                   inv_tau2_max, mm_f32, sm_count)


def stripe_rows(n_rows: int, n_cols: int, itemsize: int, block_n: int, workspace_bytes: int) -> int:
    """Rows per stripe of the forward-grad path: all N when N x M fits, else a multiple of block_n (0: none)."""
    rows = workspace_bytes // (n_cols * itemsize)
    return n_rows if rows >= n_rows else rows // block_n * block_n


def choose_keep(anchors: Tensor, candidates: Tensor, cfg: dict, reduction: str, workspace_bytes: int,
                needs_grad: bool) -> str:
    """"recompute", "keep" or "fwdgrad" (module docstring); ``cfg["keep"]``: None = choose, True / False =
    keep whenever the workspace allows / never. The workspace is a hard bound in every case."""
    if not needs_grad or cfg["keep"] is False or (cfg["keep"] is None and cfg["bwd_mode"] != "stripe"):
        return "recompute"
    (n_rows, _), n_cols, itemsize = anchors.shape, candidates.shape[0], anchors.element_size()
    if reduction == "none":
        return "keep" if n_rows * n_cols * itemsize <= workspace_bytes else "recompute"
    rows = stripe_rows(n_rows, n_cols, itemsize, cfg["keep_block_n"], workspace_bytes)
    return "fwdgrad" if rows > 0 else "recompute"


def _keep_stripe(a_ND, c_MD, pos_N, nls_N, family, cfg, row0, p_RM):
    """Keep kernels for rows [row0, row0 + R) into ``p_RM`` (R x M); returns (lse_R, f_SR, cols_per_split)."""
    (rows, n_cols), dim = p_RM.shape, a_ND.shape[1]
    block_n, block_m, block_d = cfg["keep_block_n"], cfg["keep_block_m"], cfg["keep_block_d"]
    row_blocks, n_tiles = triton.cdiv(rows, block_n), triton.cdiv(n_cols, block_m)
    splits = cfg["splits"]
    if splits is None:  # column splits fill the GPU when a stripe has few row blocks
        splits = choose_splits(row_blocks, n_tiles, 1, sm_count(a_ND.device.index))
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, splits), block_m) * block_m
    splits = triton.cdiv(n_cols, cols_per_split)
    refs = torch.empty(rows * n_tiles, dtype=torch.float32, device=a_ND.device)
    ref_SR = torch.empty((splits, rows), dtype=torch.float32, device=a_ND.device)
    l_SR = torch.empty_like(ref_SR)
    hyper, flags = hyper_args(family)
    headroom = cfg["keep_headroom"]
    if headroom is None:  # fp16 holds 2^15 at most; bf16/fp32 have fp32's exponent range
        headroom = 8.0 if a_ND.dtype == torch.float16 else 32.0
    itm2 = inv_tau2_max(family)
    COMPILED["keep"] = fwd_keep_kernel[(row_blocks, splits)](
        a_ND, c_MD, pos_N if pos_N is not None else l_SR, nls_N if nls_N is not None else l_SR, p_RM, refs,
        ref_SR, l_SR, row0 + rows, n_cols, dim, a_ND.stride(0), c_MD.stride(0), p_RM.stride(0), row0, n_tiles,
        cols_per_split, *hyper, itm2, HAS_NLS=nls_N is not None, HAS_POS=pos_N is not None, **flags,
        HEADROOM=float(headroom), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=dim % block_d == 0,
        **dot_flags(a_ND), num_warps=cfg["keep_warps"], num_stages=cfg["keep_stages"])
    # 32-row blocks: a 128 x 128 tile in 4 warps spilled (ptxas, sm_90); most programs exit after 2 x 32 loads
    fix_n = min(32, block_n)
    keep_fixup_kernel[(triton.cdiv(rows, fix_n), n_tiles)](
        p_RM, refs, ref_SR, row0 + rows, n_cols, p_RM.stride(0), row0, n_tiles, cols_per_split, BLOCK_N=fix_n,
        BLOCK_M=block_m, num_warps=4)
    # merge the splits (S x R, tiny): lse = ln 2 * log2 sum_s l_s 2^ref_s; exact for empty (-inf) splits
    lse_R = torch.logsumexp((ref_SR + torch.log2(l_SR)) * LN2, dim=0)
    f_SR = torch.exp2(ref_SR - lse_R * LOG2E) * (itm2 * LN2)  # ref = -inf -> 0
    return lse_R, f_SR, cols_per_split


def _stripe_grads(p_RM, f_SR, cols_per_split, a_RD, c_MD, g_R, need_da, dc_acc):
    """fp32 da of the stripe's rows (None unless ``need_da``); adds the stripe's dc to ``dc_acc`` (fp32,
    M x D) when given. The row factor r = g f_s scales N x D operands only (module docstring)."""
    da_RD = None
    for s, col0 in enumerate(range(0, p_RM.shape[1], cols_per_split)):
        cols = slice(col0, col0 + cols_per_split)
        p_s, r_R = p_RM[:, cols], g_R * f_SR[s]
        if need_da:
            part = mm_f32(p_s, c_MD[cols]).mul_(r_R[:, None])
            da_RD = part if da_RD is None else da_RD.add_(part)
        if dc_acc is not None:
            r_max = r_R.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)  # a tensor: no host sync
            ra_RD = (a_RD.float() * (r_R / r_max)[:, None]).to(a_RD.dtype)
            dc_acc[cols].add_(mm_f32(p_s.T, ra_RD).mul_(r_max))
    return da_RD


class _TritonKeepLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, pos_N, nls_N, family, cfg):
        a_ND, c_MD = anchors.detach().contiguous(), candidates.detach().contiguous()
        p_NM = torch.empty((a_ND.shape[0], c_MD.shape[0]), dtype=a_ND.dtype, device=a_ND.device)
        with device_of(a_ND):
            lse_N, f_SN, cols_per_split = _keep_stripe(a_ND, c_MD, pos_N, nls_N, family, cfg, 0, p_NM)
        ctx.save_for_backward(a_ND, c_MD, p_NM, f_SN)
        ctx.cols_per_split = cols_per_split
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        a_ND, c_MD, p_NM, f_SN = ctx.saved_tensors
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dc_acc = torch.zeros(c_MD.shape, dtype=torch.float32, device=c_MD.device) if need_dc else None
        with device_of(a_ND):
            da = _stripe_grads(p_NM, f_SN, ctx.cols_per_split, a_ND, c_MD, grad_lse_N.float(), need_da, dc_acc)
        da = da.to(a_ND.dtype) if need_da else None
        dc = dc_acc.to(c_MD.dtype) if need_dc else None
        return da, dc, None, None, None, None


class _TritonFwdGradLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, pos_N, nls_N, family, cfg, reduction, workspace_bytes):
        a_ND, c_MD = anchors.detach().contiguous(), candidates.detach().contiguous()
        (n_rows, _), n_cols = a_ND.shape, c_MD.shape[0]
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows_per = stripe_rows(n_rows, n_cols, a_ND.element_size(), cfg["keep_block_n"], workspace_bytes)
        workspace = torch.empty(rows_per * n_cols, dtype=a_ND.dtype, device=a_ND.device)
        lse_N = torch.empty(n_rows, dtype=torch.float32, device=a_ND.device)
        da = torch.empty_like(a_ND) if need_da else None
        dc_acc = torch.zeros(c_MD.shape, dtype=torch.float32, device=c_MD.device) if need_dc else None
        g_unit = 1.0 / n_rows if reduction == "mean" else 1.0
        with device_of(a_ND):
            for row0 in range(0, n_rows, rows_per):
                rows = min(rows_per, n_rows - row0)
                p_RM = workspace[:rows * n_cols].view(rows, n_cols)
                lse_R, f_SR, cols_per_split = _keep_stripe(a_ND, c_MD, pos_N, nls_N, family, cfg, row0, p_RM)
                lse_N[row0:row0 + rows] = lse_R
                g_R = torch.full((rows,), g_unit, dtype=torch.float32, device=a_ND.device)
                da_RD = _stripe_grads(p_RM, f_SR, cols_per_split, a_ND[row0:row0 + rows], c_MD, g_R, need_da,
                                      dc_acc)
                if need_da:
                    da[row0:row0 + rows] = da_RD
        ctx.save_for_backward(da, None if dc_acc is None else dc_acc.to(c_MD.dtype))
        return lse_N.mean() if reduction == "mean" else lse_N.sum()

    @staticmethod
    def backward(ctx, grad_out):
        da, dc = ctx.saved_tensors
        scale = grad_out.float()
        da = None if da is None else (da * scale).to(da.dtype)
        dc = None if dc is None else (dc * scale).to(dc.dtype)
        return da, dc, None, None, None, None, None, None


def keep_lse(anchors, candidates, pos_N, nls_N, family, cfg) -> Tensor:
    """The "keep" path: float32 lse (N,), gradient tiles kept until the backward."""
    return _TritonKeepLSE.apply(anchors, candidates, pos_N, nls_N, family, cfg)


def keep_fwdgrad_lse(anchors, candidates, pos_N, nls_N, family, cfg, reduction, workspace_bytes) -> Tensor:
    """The "fwdgrad" path: mean or sum of lse (a float32 scalar), gradients computed in the forward."""
    return _TritonFwdGradLSE.apply(anchors, candidates, pos_N, nls_N, family, cfg, reduction, workspace_bytes)
