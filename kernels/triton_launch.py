"""Launch helpers shared by the Triton backend's modules: block configurations, scalar kernel arguments,
split counts and fp32-accumulating products (``kernels/triton_op.py``: recompute path and entry points;
``kernels/triton_keep.py``: keep paths). Imported only when triton is.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from .family import Family

# last launched compiled kernel per role (benchmarks read registers / spills from it)
COMPILED: dict = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def default_triton_config(anchors: Tensor, candidates: Tensor) -> dict:
    """Block sizes / warps / stages chosen in the launcher (no autotune: it breaks the interpreter).

    Keys: fwd_* (fwd_flat: one flattened tile x D-chunk loop), grad_* (stripe-mode G tiles), bwd_* (fused
    da/dc kernels), keep_* (keep-mode kernel, ``kernels/triton_keep.py``), splits (None = pick from the SM
    count and fwd_ctas_per_sm; also the keep kernel's column splits), bwd_mode ("fused" | "stripe"),
    keep (None = choose, True = keep whenever the workspace allows, False = always recompute),
    keep_headroom (None = 8 for fp16, 32 otherwise; base-2 headroom of the keep kernel's row reference).
    The workspace (stripe G buffer, keep-mode tiles) is the op's ``workspace_bytes`` argument.
    """
    dim = anchors.shape[1]
    if interpreting() or not anchors.is_cuda:
        # small tiles: odd test shapes cross several blocks; D chunks of 16 exercise the D loop and masks
        return dict(fwd_block_n=16, fwd_block_m=16, fwd_block_d=16, fwd_warps=1, fwd_stages=1,
                    grad_block_n=16, grad_block_m=16, grad_block_d=16, grad_warps=1, grad_stages=1,
                    bwd_block_n=16, bwd_block_m=16, bwd_block_d=16, bwd_block_do=16, bwd_warps=1, bwd_stages=1,
                    keep_block_n=16, keep_block_m=16, keep_block_d=16, keep_warps=1, keep_stages=1,
                    splits=1, fwd_ctas_per_sm=1, fwd_flat=False, bwd_mode="fused", keep=None, keep_headroom=None)
    if anchors.dtype == torch.float32:
        cfg = dict(fwd_block_n=64, fwd_block_m=64, fwd_block_d=32, fwd_warps=4, fwd_stages=2,
                   grad_block_n=64, grad_block_m=64, grad_block_d=32, grad_warps=4, grad_stages=2,
                   keep_block_n=64, keep_block_m=64, keep_block_d=32, keep_warps=4, keep_stages=2,
                   bwd_block_n=64, bwd_block_m=64, bwd_block_d=32, bwd_warps=4, bwd_stages=2)
    else:
        # H100 sweep at 16384 x 16384 x 768 (benchmarks/README_kernel.md): 128 x 256 forward tiles best
        cfg = dict(fwd_block_n=128, fwd_block_m=256, fwd_block_d=64, fwd_warps=8, fwd_stages=3,
                   grad_block_n=128, grad_block_m=128, grad_block_d=64, grad_warps=8, grad_stages=3,
                   # keep kernel: the G-tile kernel's sweep winner (same epilogue + store); untuned on GPU
                   keep_block_n=128, keep_block_m=128, keep_block_d=64, keep_warps=8, keep_stages=3,
                   bwd_block_n=64, bwd_block_m=64, bwd_block_d=64, bwd_warps=4, bwd_stages=2)
    # fused backward keeps a [64, BLOCK_DO] fp32 accumulator; D above 256 is cheaper as stripes + cuBLAS
    # >= 64: a [64, 32] bf16 accumulator tile gave wrong da with triton 3.6 on an H100 (fp32 was right)
    cfg["bwd_block_do"] = min(max(_next_pow2(dim), 64), 128 if anchors.dtype == torch.float32 else 256)
    if cfg["bwd_block_do"] >= 128:
        cfg["bwd_warps"] = 8
    cfg.update(splits=None, fwd_ctas_per_sm=1 if anchors.dtype != torch.float32 else 2, fwd_flat=False,
               bwd_mode="stripe" if dim > 256 else "fused", keep=None, keep_headroom=None)
    return cfg


def _pow_mode(gamma: float) -> int:
    """Exponent specialisation: 0 (no family), 1 and 2 (multiplies), -1 (exp2/log2)."""
    return 0 if gamma == 0 else 1 if gamma == 1 else 2 if gamma == 2 else -1


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def hyper_args(family: Family):
    """Scalar kernel arguments and flags: (log2(e)/temperature, weight_gamma, tau_min ln 2,
    (tau_max - tau_min) ln 2, tau_gamma), i.e. LOG2E folded into the temperatures (triton_kernels.LOG2E)."""
    has_tau = family.tau_min is not None
    args = (LOG2E / family.temperature, family.weight_gamma, family.tau_min * LN2 if has_tau else 0.0,
            (family.tau_max - family.tau_min) * LN2 if has_tau else 0.0, family.tau_gamma)
    flags = dict(WEIGHT_POW=_pow_mode(family.weight_gamma), TAU_POW=_pow_mode(family.tau_gamma) if has_tau else 0)
    return args, flags


def dot_flags(a: Tensor) -> dict:
    dot_fp32 = interpreting() or a.dtype == torch.float32
    ieee = dot_fp32 and not (a.is_cuda and not interpreting() and torch.backends.cuda.matmul.allow_tf32)
    return dict(DOT_FP32=dot_fp32, IEEE_FP32=ieee)


@functools.lru_cache(maxsize=None)
def sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(row_blocks: int, col_blocks: int, ctas_per_sm: int, n_sm: int) -> int:
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


def inv_tau2_max(family: Family) -> float:
    """log2(e) / (smallest temperature of the family): the keep kernel divides 1/tau by it (stored <= 1)."""
    taus = [family.temperature] + ([family.tau_min, family.tau_max] if family.tau_min is not None else [])
    return LOG2E / min(taus)


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_ok(device_type: str) -> bool:
    """torch.mm(..., out_dtype=float32) for bf16 inputs exists on this device type (CUDA, torch >= 2.8)."""
    try:
        x = torch.zeros(2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def mm_f32(x: Tensor, y: Tensor) -> Tensor:
    """x @ y with fp32 accumulation AND an fp32 result (no rounding to bf16/fp16 in between)."""
    if x.dtype == torch.float32:
        return torch.mm(x, y)
    if x.is_cuda and _mm_out_dtype_ok(x.device.type):
        return torch.mm(x, y, out_dtype=torch.float32)
    if x.is_cuda:  # older torch: one low-precision rounding of the product
        return torch.mm(x, y).float()
    return torch.mm(x.float(), y.float())  # CPU tensors (the interpreter): the same products in fp32


def addmm_f32_(acc: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """acc += x @ y for an fp32 accumulator ``acc``."""
    if x.dtype == torch.float32:
        return acc.addmm_(x, y)
    return acc.add_(mm_f32(x, y))


def device_of(t: Tensor):
    """The CUDA device context for launches (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
