"""Triton backend of the op: the recompute path (forward lse, backward recomputing tiles), the
autograd.Function, the choice of path and the entry points.

Spec in ``kernels/__init__.py``, kernel numerics and layout in ``kernels/triton_kernels.py``, block
configurations and launch helpers in ``kernels/triton_launch.py``, the keep paths (gradient tiles produced
in the forward, 6NMD instead of 8NMD FLOPs) in ``kernels/triton_keep.py``. Legend: N anchors/rows,
M candidates/columns, D embedding dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from .family import (DEFAULT_WORKSPACE_BYTES, Family, check_family, check_reduction, check_tensors,
                     check_workspace)
from .triton_keep import choose_keep, keep_fwdgrad_lse, keep_lse
from .triton_kernels import bwd_da_kernel, bwd_dc_kernel, bwd_grad_kernel, fwd_kernel
from .triton_launch import (COMPILED, addmm_f32_, choose_splits, default_triton_config, device_of, dot_flags,
                            hyper_args, interpreting, sm_count)

_COMPILED = COMPILED  # the name benchmarks/kernel.py reads
__all__ = ["default_triton_config", "triton_lse", "triton_sim_softmax_lse", "triton_forward"]


def triton_forward(a_ND, c_MD, pos_N, nls_N, family, cfg) -> Tensor:
    """float32 lse (N,) of contiguous inputs (no autograd)."""
    n_rows, dim = a_ND.shape
    n_cols = c_MD.shape[0]
    block_n, block_m, block_d = cfg["fwd_block_n"], cfg["fwd_block_m"], cfg["fwd_block_d"]
    row_blocks = triton.cdiv(n_rows, block_n)
    splits = cfg["splits"]
    if splits is None:
        splits = choose_splits(row_blocks, triton.cdiv(n_cols, block_m), cfg["fwd_ctas_per_sm"],
                               sm_count(a_ND.device.index))
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, splits), block_m) * block_m
    splits = triton.cdiv(n_cols, cols_per_split)
    lse_part = torch.empty((splits, n_rows), dtype=torch.float32, device=a_ND.device)
    hyper, flags = hyper_args(family)
    COMPILED["fwd"] = fwd_kernel[(row_blocks, splits)](
        a_ND, c_MD, pos_N if pos_N is not None else lse_part, nls_N if nls_N is not None else lse_part, lse_part,
        n_rows, n_cols, dim, a_ND.stride(0), c_MD.stride(0), cols_per_split, *hyper, HAS_NLS=nls_N is not None,
        HAS_POS=pos_N is not None, **flags,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=dim % block_d == 0, **dot_flags(a_ND),
        FLAT=bool(cfg["fwd_flat"]), num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    # merge the column splits' partial lse (tiny: splits x N); exact for -inf partials
    return lse_part[0] if splits == 1 else torch.logsumexp(lse_part, dim=0)


def _stripe_backward(a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, hyper, launch, workspace_bytes, need_da,
                     need_dc):
    """G = g p / tau for a stripe into a bounded workspace, cuBLAS for da = G C and dc = G^T A.

    Rows are striped when N >= M (da complete per stripe, dc accumulated in fp32), columns when M > N (dc
    complete per stripe, only da accumulated): the accumulated side is always the smaller one.
    """
    (n_rows, dim), n_cols = a_ND.shape, c_MD.shape[0]
    block_n, block_m = launch["BLOCK_N"], launch["BLOCK_M"]
    by_cols = n_cols > n_rows
    total, other, block = (n_cols, n_rows, block_m) if by_cols else (n_rows, n_cols, block_n)
    per = min(total, max(block, workspace_bytes // (a_ND.element_size() * other) // block * block))
    workspace = torch.empty(per * other, dtype=a_ND.dtype, device=a_ND.device)
    da = torch.empty_like(a_ND) if need_da else None
    dc = torch.empty_like(c_MD) if need_dc else None
    acc = None  # fp32 accumulator of the side that sums over stripes (only with several stripes)
    if per < total and (need_da if by_cols else need_dc):
        acc = torch.zeros((n_rows if by_cols else n_cols, dim), dtype=torch.float32, device=a_ND.device)
    for start in range(0, total, per):
        stop = min(start + per, total)
        (r0, r1), (c0, c1) = ((0, n_rows), (start, stop)) if by_cols else ((start, stop), (0, n_cols))
        g = workspace[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        COMPILED["grad"] = bwd_grad_kernel[(triton.cdiv(r1 - r0, block_n), triton.cdiv(c1 - c0, block_m))](
            a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, g, r1, c1, dim, a_ND.stride(0), c_MD.stride(0), g.stride(0),
            r0, c0, *hyper, **launch)
        if need_da:  # G C[c0:c1]: complete when striping rows, summed over column stripes otherwise
            if acc is not None and by_cols:
                addmm_f32_(acc, g, c_MD[c0:c1])
            else:
                torch.mm(g, c_MD[c0:c1], out=da[r0:r1])
        if need_dc:
            if acc is not None and not by_cols:
                addmm_f32_(acc, g.T, a_ND[r0:r1])
            else:
                torch.mm(g.T, a_ND[r0:r1], out=dc[c0:c1])
    if acc is not None:
        (da if by_cols else dc).copy_(acc)
    return da, dc


def _triton_backward(a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, family, cfg, workspace_bytes, need_da, need_dc):
    n_rows, dim = a_ND.shape
    n_cols = c_MD.shape[0]
    hyper, flags = hyper_args(family)
    common = dict(HAS_NLS=nls_N is not None, HAS_POS=pos_N is not None, **flags, **dot_flags(a_ND))
    nls_arg = nls_N if nls_N is not None else lse_N  # placeholders for absent optional inputs
    pos_N = pos_N if pos_N is not None else lse_N
    if cfg["bwd_mode"] == "stripe":
        launch = dict(BLOCK_N=cfg["grad_block_n"], BLOCK_M=cfg["grad_block_m"],
                      BLOCK_D=cfg["grad_block_d"], EVEN_D=dim % cfg["grad_block_d"] == 0,
                      num_warps=cfg["grad_warps"], num_stages=cfg["grad_stages"], **common)
        return _stripe_backward(a_ND, c_MD, pos_N, nls_arg, lse_N, grad_N, hyper, launch, workspace_bytes,
                                need_da, need_dc)
    if cfg["bwd_mode"] != "fused":
        raise ValueError(f"unknown bwd_mode {cfg['bwd_mode']!r}; expected 'fused' or 'stripe'")
    # recompute tiles; deterministic: da over row blocks, dc over column blocks, no atomics
    block_n, block_m, block_d, block_do = (cfg["bwd_block_n"], cfg["bwd_block_m"], cfg["bwd_block_d"],
                                           cfg["bwd_block_do"])
    launch = dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DO=block_do,
                  EVEN_D=dim % block_d == 0, num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"], **common)
    da = torch.empty_like(a_ND) if need_da else None
    dc = torch.empty_like(c_MD) if need_dc else None
    if need_da:
        COMPILED["da"] = bwd_da_kernel[(triton.cdiv(n_rows, block_n), triton.cdiv(dim, block_do))](
            a_ND, c_MD, pos_N, nls_arg, lse_N, grad_N, da, n_rows, n_cols, dim, a_ND.stride(0),
            c_MD.stride(0), da.stride(0), *hyper, **launch)
    if need_dc:
        COMPILED["dc"] = bwd_dc_kernel[(triton.cdiv(n_cols, block_m), triton.cdiv(dim, block_do))](
            a_ND, c_MD, pos_N, nls_arg, lse_N, grad_N, dc, n_rows, n_cols, dim, a_ND.stride(0),
            c_MD.stride(0), dc.stride(0), *hyper, **launch)
    return da, dc


class _TritonSimSoftmaxLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, pos_N, nls_N, family, cfg, workspace_bytes):
        a_ND = anchors.detach().contiguous()
        c_MD = candidates.detach().contiguous()
        with device_of(a_ND):
            lse_N = triton_forward(a_ND, c_MD, pos_N, nls_N, family, cfg)
        ctx.save_for_backward(a_ND, c_MD, pos_N, nls_N, lse_N)
        ctx.family, ctx.cfg, ctx.workspace_bytes = family, cfg, workspace_bytes
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        a_ND, c_MD, pos_N, nls_N, lse_N = ctx.saved_tensors
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_da or need_dc):
            return None, None, None, None, None, None, None
        grad_N = grad_lse_N.detach().to(torch.float32).contiguous()
        with device_of(a_ND):
            da, dc = _triton_backward(a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, ctx.family, ctx.cfg,
                                      ctx.workspace_bytes, need_da, need_dc)
        return da, dc, None, None, None, None, None


def triton_lse(anchors: Tensor, candidates: Tensor, family: Family, positive_index_N: Optional[Tensor],
               neg_log_scale_N: Optional[Tensor], config: Optional[dict] = None, *, reduction: str = "none",
               workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> Tensor:
    """float32 lse (N,), or its mean / sum (``reduction``), from checked inputs (``check_family``;
    ``check_tensors(default_index=False)``); the path (recompute, keep, forward-grad) from ``choose_keep``.

    Checks only what is Triton's own: the device, the dtype and the ``config`` keys.
    """
    if not anchors.is_cuda and not interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported")
    if anchors.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"backend='triton' supports float32/float16/bfloat16, got {anchors.dtype}")
    cfg = default_triton_config(anchors, candidates)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown triton config keys {sorted(unknown)}")
        cfg.update(config)
    if positive_index_N is not None:  # None: positive of row i is column i, computed in-kernel
        positive_index_N = positive_index_N.to(torch.int32).contiguous()  # M < 2^31 columns
    if neg_log_scale_N is not None:
        neg_log_scale_N = neg_log_scale_N.to(torch.float32).contiguous()
    args = (anchors, candidates, positive_index_N, neg_log_scale_N, family, cfg)
    needs_grad = torch.is_grad_enabled() and (anchors.requires_grad or candidates.requires_grad)
    path = choose_keep(anchors, candidates, cfg, reduction, workspace_bytes, needs_grad)
    if path == "fwdgrad":
        return keep_fwdgrad_lse(*args, reduction, workspace_bytes)
    lse_N = keep_lse(*args) if path == "keep" else _TritonSimSoftmaxLSE.apply(*args, workspace_bytes)
    return lse_N if reduction == "none" else lse_N.mean() if reduction == "mean" else lse_N.sum()


def triton_sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                           weight_gamma: float = 0.0, tau_min: Optional[float] = None,
                           tau_max: Optional[float] = None, tau_gamma: float = 1.0,
                           positive_index: Optional[Tensor] = None, neg_log_scale: Optional[Tensor] = None,
                           config: Optional[dict] = None, reduction: str = "none",
                           workspace_bytes: Optional[int] = None) -> Tensor:
    """Triton ``sim_softmax_lse`` (float32 (N,) lse, or a scalar with ``reduction``). ``config`` overrides
    ``default_triton_config`` keys."""
    family = check_family(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
                          tau_max=tau_max, tau_gamma=tau_gamma)
    positive_index, neg_log_scale = check_tensors(anchors, candidates, positive_index, neg_log_scale,
                                                  default_index=False)
    return triton_lse(anchors, candidates, family, positive_index, neg_log_scale, config,
                      reduction=check_reduction(reduction), workspace_bytes=check_workspace(workspace_bytes))
