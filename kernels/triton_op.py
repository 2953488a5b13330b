"""Triton backend of the op: launch configurations, launchers, the autograd.Function, the entry points.

Spec in ``kernels/__init__.py``, kernel numerics and layout in ``kernels/triton_kernels.py`` (imported only
when triton is). Legend: N anchors/rows, M candidates/columns, D embedding dim.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from .family import Family, check_family, check_tensors
from .triton_kernels import bwd_da_kernel, bwd_dc_kernel, bwd_grad_kernel, fwd_kernel

# last launched compiled kernel per role (benchmarks read registers / spills from it)
_COMPILED: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def default_triton_config(anchors: Tensor, candidates: Tensor) -> dict:
    """Block sizes / warps / stages chosen in the launcher (no autotune: it breaks the interpreter).

    Keys: fwd_* (fwd_flat: one flattened tile x D-chunk loop), grad_* (stripe-mode G tiles), bwd_* (fused
    da/dc kernels), splits (None = pick from the SM count and fwd_ctas_per_sm), bwd_mode ("fused" |
    "stripe"), workspace_bytes (stripe-mode G buffer cap).
    """
    dim = anchors.shape[1]
    if _interpreting() or not anchors.is_cuda:
        # small tiles: odd test shapes cross several blocks; D chunks of 16 exercise the D loop and masks
        return dict(fwd_block_n=16, fwd_block_m=16, fwd_block_d=16, fwd_warps=1, fwd_stages=1,
                    grad_block_n=16, grad_block_m=16, grad_block_d=16, grad_warps=1, grad_stages=1,
                    bwd_block_n=16, bwd_block_m=16, bwd_block_d=16, bwd_block_do=16, bwd_warps=1, bwd_stages=1,
                    splits=1, fwd_ctas_per_sm=1, fwd_flat=False, bwd_mode="fused",
                    workspace_bytes=1 << 28)
    if anchors.dtype == torch.float32:
        cfg = dict(fwd_block_n=64, fwd_block_m=64, fwd_block_d=32, fwd_warps=4, fwd_stages=2,
                   grad_block_n=64, grad_block_m=64, grad_block_d=32, grad_warps=4, grad_stages=2,
                   bwd_block_n=64, bwd_block_m=64, bwd_block_d=32, bwd_warps=4, bwd_stages=2)
    else:
        # H100 sweep at 16384 x 16384 x 768 (benchmarks/README_kernel.md): 128 x 256 forward tiles best
        cfg = dict(fwd_block_n=128, fwd_block_m=256, fwd_block_d=64, fwd_warps=8, fwd_stages=3,
                   grad_block_n=128, grad_block_m=128, grad_block_d=64, grad_warps=8, grad_stages=3,
                   bwd_block_n=64, bwd_block_m=64, bwd_block_d=64, bwd_warps=4, bwd_stages=2)
    # fused backward keeps a [64, BLOCK_DO] fp32 accumulator; D above 256 is cheaper as stripes + cuBLAS
    # >= 64: a [64, 32] bf16 accumulator tile gave wrong da with triton 3.6 on an H100 (fp32 was right)
    cfg["bwd_block_do"] = min(max(_next_pow2(dim), 64), 128 if anchors.dtype == torch.float32 else 256)
    if cfg["bwd_block_do"] >= 128:
        cfg["bwd_warps"] = 8
    cfg.update(splits=None, fwd_ctas_per_sm=1 if anchors.dtype != torch.float32 else 2, fwd_flat=False,
               bwd_mode="stripe" if dim > 256 else "fused", workspace_bytes=1 << 28)
    return cfg


def _pow_mode(gamma: float) -> int:
    """Exponent specialisation: 0 (no family), 1 and 2 (multiplies), -1 (exp2/log2)."""
    return 0 if gamma == 0 else 1 if gamma == 1 else 2 if gamma == 2 else -1


def _hyper_args(family: Family):
    """Scalar kernel arguments (1/temperature, weight_gamma, tau_min, tau_max - tau_min, tau_gamma) and flags."""
    has_tau = family.tau_min is not None
    args = (1.0 / family.temperature, family.weight_gamma, family.tau_min if has_tau else 0.0,
            (family.tau_max - family.tau_min) if has_tau else 0.0, family.tau_gamma)
    flags = dict(WEIGHT_POW=_pow_mode(family.weight_gamma), TAU_POW=_pow_mode(family.tau_gamma) if has_tau else 0)
    return args, flags


def _dot_flags(a: Tensor) -> dict:
    dot_fp32 = _interpreting() or a.dtype == torch.float32
    ieee = dot_fp32 and not (a.is_cuda and not _interpreting() and torch.backends.cuda.matmul.allow_tf32)
    return dict(DOT_FP32=dot_fp32, IEEE_FP32=ieee)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_splits(row_blocks: int, col_blocks: int, ctas_per_sm: int, n_sm: int) -> int:
    """Column splits so that row_blocks * splits programs fill the GPU's CTA slots with little tail.

    Small N alone would leave SMs idle (one program per BLOCK_N rows); each split keeps >= 4 column tiles.
    """
    slots = ctas_per_sm * n_sm
    best, best_eff = 1, 0.0
    for splits in range(1, max(1, col_blocks // 4) + 1):
        programs = row_blocks * splits
        eff = programs / (-(-programs // slots) * slots)  # busy fraction of the last wave included
        if eff > best_eff + 0.02:
            best, best_eff = splits, eff
        if programs >= 4 * slots:
            break
    return best


def _triton_forward(a_ND, c_MD, pos_N, nls_N, family, cfg) -> Tensor:
    n_rows, dim = a_ND.shape
    n_cols = c_MD.shape[0]
    block_n, block_m, block_d = cfg["fwd_block_n"], cfg["fwd_block_m"], cfg["fwd_block_d"]
    row_blocks = triton.cdiv(n_rows, block_n)
    splits = cfg["splits"]
    if splits is None:
        splits = _choose_splits(row_blocks, triton.cdiv(n_cols, block_m), cfg["fwd_ctas_per_sm"],
                                _sm_count(a_ND.device.index))
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, splits), block_m) * block_m
    splits = triton.cdiv(n_cols, cols_per_split)
    lse_part = torch.empty((splits, n_rows), dtype=torch.float32, device=a_ND.device)
    hyper, flags = _hyper_args(family)
    _COMPILED["fwd"] = fwd_kernel[(row_blocks, splits)](
        a_ND, c_MD, pos_N if pos_N is not None else lse_part, nls_N if nls_N is not None else lse_part, lse_part,
        n_rows, n_cols, dim, a_ND.stride(0), c_MD.stride(0), cols_per_split, *hyper, HAS_NLS=nls_N is not None,
        HAS_POS=pos_N is not None, **flags,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=dim % block_d == 0, **_dot_flags(a_ND),
        FLAT=bool(cfg["fwd_flat"]), num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    # merge the column splits' partial lse (tiny: splits x N); exact for -inf partials
    return lse_part[0] if splits == 1 else torch.logsumexp(lse_part, dim=0)


def _triton_backward(a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, family, cfg, need_da, need_dc):
    n_rows, dim = a_ND.shape
    n_cols = c_MD.shape[0]
    hyper, flags = _hyper_args(family)
    common = dict(HAS_NLS=nls_N is not None, HAS_POS=pos_N is not None, **flags, **_dot_flags(a_ND))
    nls_arg = nls_N if nls_N is not None else lse_N  # placeholders for absent optional inputs
    pos_N = pos_N if pos_N is not None else lse_N
    da = torch.empty_like(a_ND) if need_da else None
    dc = torch.empty_like(c_MD) if need_dc else None
    if cfg["bwd_mode"] == "fused":
        # recompute tiles; deterministic: da over row blocks, dc over column blocks, no atomics
        block_n, block_m, block_d, block_do = (cfg["bwd_block_n"], cfg["bwd_block_m"], cfg["bwd_block_d"],
                                               cfg["bwd_block_do"])
        launch = dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DO=block_do,
                      EVEN_D=dim % block_d == 0, num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"],
                      **common)
        if need_da:
            _COMPILED["da"] = bwd_da_kernel[(triton.cdiv(n_rows, block_n), triton.cdiv(dim, block_do))](
                a_ND, c_MD, pos_N, nls_arg, lse_N, grad_N, da, n_rows, n_cols, dim, a_ND.stride(0),
                c_MD.stride(0), da.stride(0), *hyper, **launch)
        if need_dc:
            _COMPILED["dc"] = bwd_dc_kernel[(triton.cdiv(n_cols, block_m), triton.cdiv(dim, block_do))](
                a_ND, c_MD, pos_N, nls_arg, lse_N, grad_N, dc, n_rows, n_cols, dim, a_ND.stride(0),
                c_MD.stride(0), dc.stride(0), *hyper, **launch)
        return da, dc
    if cfg["bwd_mode"] != "stripe":
        raise ValueError(f"unknown bwd_mode {cfg['bwd_mode']!r}; expected 'fused' or 'stripe'")
    # stripe mode (large D): G = g p / tau for a stripe of rows goes to a bounded workspace, cuBLAS does
    # da[stripe] = G C (complete per stripe) and dc += G^T A[stripe] (fp32 accumulation across stripes).
    block_n, block_m, block_d = cfg["grad_block_n"], cfg["grad_block_m"], cfg["grad_block_d"]
    launch = dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=dim % block_d == 0,
                  num_warps=cfg["grad_warps"], num_stages=cfg["grad_stages"], **common)
    budget = max(cfg["workspace_bytes"] // (a_ND.element_size() * n_cols), 1)
    rows_per = min(n_rows, max(block_n, budget // block_n * block_n))
    workspace = torch.empty(rows_per * n_cols, dtype=a_ND.dtype, device=a_ND.device)
    single = rows_per >= n_rows
    low_precision_multi = need_dc and not single and dc.dtype != torch.float32
    dc32 = torch.zeros_like(dc, dtype=torch.float32) if low_precision_multi else dc
    partial = None
    for row0 in range(0, n_rows, rows_per):
        rows = min(rows_per, n_rows - row0)
        g_RM = workspace[:rows * n_cols].view(rows, n_cols)
        _COMPILED["grad"] = bwd_grad_kernel[(triton.cdiv(rows, block_n), triton.cdiv(n_cols, block_m))](
            a_ND, c_MD, pos_N, nls_arg, lse_N, grad_N, g_RM, row0 + rows, n_cols, dim, a_ND.stride(0),
            c_MD.stride(0), n_cols, row0, *hyper, **launch)
        if need_da:
            torch.mm(g_RM, c_MD, out=da[row0:row0 + rows])
        if need_dc:
            a_RD = a_ND[row0:row0 + rows]
            if row0 == 0 and dc32.dtype == a_ND.dtype:
                torch.mm(g_RM.T, a_RD, out=dc32)
            elif dc32.dtype == a_ND.dtype:  # fp32 inputs: accumulate in place
                dc32.addmm_(g_RM.T, a_RD)
            else:  # low precision: each stripe's product rounds once, the sum is fp32
                partial = torch.mm(g_RM.T, a_RD) if partial is None else torch.mm(g_RM.T, a_RD, out=partial)
                dc32.add_(partial)
    if need_dc and dc32 is not dc:
        dc.copy_(dc32)
    return da, dc


class _TritonSimSoftmaxLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, pos_N, nls_N, family, cfg):
        a_ND = anchors.detach().contiguous()
        c_MD = candidates.detach().contiguous()
        with torch.cuda.device(a_ND.device) if a_ND.is_cuda else contextlib.nullcontext():
            lse_N = _triton_forward(a_ND, c_MD, pos_N, nls_N, family, cfg)
        ctx.save_for_backward(a_ND, c_MD, pos_N, nls_N, lse_N)
        ctx.family, ctx.cfg = family, cfg
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        a_ND, c_MD, pos_N, nls_N, lse_N = ctx.saved_tensors
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_da or need_dc):
            return None, None, None, None, None, None
        grad_N = grad_lse_N.detach().to(torch.float32).contiguous()
        with torch.cuda.device(a_ND.device) if a_ND.is_cuda else contextlib.nullcontext():
            da, dc = _triton_backward(a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, ctx.family, ctx.cfg, need_da,
                                      need_dc)
        return da, dc, None, None, None, None


def triton_lse(anchors: Tensor, candidates: Tensor, family: Family, positive_index_N: Optional[Tensor],
               neg_log_scale_N: Optional[Tensor], config: Optional[dict] = None) -> Tensor:
    """float32 lse (N,) from checked inputs (``check_family``; ``check_tensors(default_index=False)``).

    Checks only what is Triton's own: the device, the dtype and the ``config`` keys.
    """
    if not anchors.is_cuda and not _interpreting():
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
    return _TritonSimSoftmaxLSE.apply(anchors, candidates, positive_index_N, neg_log_scale_N, family, cfg)


def triton_sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                           weight_gamma: float = 0.0, tau_min: Optional[float] = None,
                           tau_max: Optional[float] = None, tau_gamma: float = 1.0,
                           positive_index: Optional[Tensor] = None, neg_log_scale: Optional[Tensor] = None,
                           config: Optional[dict] = None) -> Tensor:
    """Triton ``sim_softmax_lse`` (float32 (N,) lse). ``config`` overrides ``default_triton_config`` keys."""
    family = check_family(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
                          tau_max=tau_max, tau_gamma=tau_gamma)
    positive_index, neg_log_scale = check_tensors(anchors, candidates, positive_index, neg_log_scale,
                                                  default_index=False)
    return triton_lse(anchors, candidates, family, positive_index, neg_log_scale, config)
