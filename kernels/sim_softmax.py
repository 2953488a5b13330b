"""Similarity log-sum-exp over candidates: Triton kernels, launchers, autograd.Function, torch reference.

Spec (legend: N anchors/rows, M candidates/columns, D embedding dim; inputs already L2-normalised)::

    s_ij   = <a_i, c_j>
    lse_i  = log sum_j w_ij * exp(s_ij / tau_ij)

Weights and temperatures are computed from the stop-gradient similarity ``sg(s_ij)`` clamped to [-1, 1]:

    w_ij   = ((1 - sg(s_ij)) / 2) ** weight_gamma                     (weight_gamma = 0 -> 1)
    tau_ij = temperature                                              (tau_min/tau_max None)
           = tau_min + (tau_max - tau_min) * ((1 + sg(s_ij)) / 2) ** tau_gamma

The positive column j = p(i) (``positive_index``, default arange(N)) always has weight 1 and temperature
``temperature``. ``neg_log_scale`` (N,) is added to log w_ij of every negative column of row i. Both are
constants for autograd; gradients flow through s_ij only (d(s/tau)/ds = 1/tau):

    d lse_i / d s_ij = p_ij / tau_ij,   p_ij = w_ij exp(s_ij / tau_ij - lse_i)
    da_i = sum_j g_i p_ij / tau_ij c_j,  dc_j = sum_i g_i p_ij / tau_ij a_i       (g = upstream grad)

At s_ij = 1 and weight_gamma > 0, log w_ij = -inf: the term vanishes (zero probability, zero gradient).
lse is float32 for fp16/bf16/fp32 inputs (float64 for float64 inputs on the torch backends); input
gradients have the input dtype.

Backends: "triton" (this file), "chunked" (``kernels/chunked.py``, pure torch over column blocks),
"reference" (dense N x M torch, ``upcast=True`` for float64; tests and benchmarks use it).

Triton numerics and layout (flash-attention style, nothing of size N x M ever reaches memory):
- forward: a program owns BLOCK_N rows and one split of the columns; per BLOCK_M column tile it computes
  s with ``tl.dot`` over D in BLOCK_D chunks (fp32 accumulation; bf16/fp16 tensor cores, IEEE fp32 for fp32
  inputs unless TF32 is allowed), derives w and tau in-kernel, and keeps a running max and sum in base 2
  (log2(e) folded into the 1/tau scale, ``exp2``; weights multiply, so gamma in {1, 2} costs no special
  function and zero weights drop out of the max). Column splits (so that small N still fills the GPU)
  write partial lse (splits x N); torch merges them. Saved for backward: lse (N,).
- backward "fused" (D <= 256): deterministic two kernels recompute tiles; da over row blocks, dc over
  column blocks, each holding a [block, BLOCK_DO] fp32 accumulator (D is split in BLOCK_DO chunks).
- backward "stripe" (D > 256 on GPU, where a full-D fp32 accumulator does not fit in registers): a kernel
  writes G = g p / tau for a stripe of rows into a bounded workspace (``workspace_bytes``, not O(N M)), then
  cuBLAS computes da[stripe] = G C and dc += G^T A[stripe] (dc accumulated in fp32 across stripes).
- pointer offsets are int64 (row * stride may exceed 2^31). Under TRITON_INTERPRET=1 the launcher picks small
  fixed blocks (no autotune) and tiles are cast to fp32 before ``tl.dot`` (bf16 dot is broken there).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "chunked", "reference")


def triton_available() -> bool:
    """True when the ``triton`` package imported (the Triton backend exists)."""
    return _HAS_TRITON


# ----------------------------------------------------------------------------------------------------------
# Input checking shared by every backend
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(anchors, candidates, *, temperature, weight_gamma, tau_min, tau_max, tau_gamma,
                  positive_index, neg_log_scale, check_range=True, default_index=True):
    """Validate shapes and hyper-parameters; return (positive_index, neg_log_scale) materialised.

    ``default_index=False`` keeps a None positive_index as None (the Triton kernels use the row index).
    """
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
        if default_index:
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
            lo, hi = torch.stack(torch.aminmax(positive_index)).tolist()  # one device sync
            if lo < 0 or hi >= n_cols:
                raise ValueError(f"positive_index out of range [0, {n_cols}): min {lo}, max {hi}")
    if neg_log_scale is not None:
        if not isinstance(neg_log_scale, Tensor) or neg_log_scale.shape != (n_rows,):
            raise ValueError(f"neg_log_scale must be a tensor of shape (N,)=({n_rows},)")
        neg_log_scale = neg_log_scale.detach().to(device=anchors.device,
                                                  dtype=torch.promote_types(anchors.dtype, torch.float32))
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
# Triton kernels (defined only when triton imports; TRITON_INTERPRET is read when they are decorated)
# ----------------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = tl = None
    _HAS_TRITON = False

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

if _HAS_TRITON:

    @triton.jit
    def _dot_acc(x, y, acc, IEEE_FP32: tl.constexpr):
        if IEEE_FP32:  # exact fp32 products (no TF32), for fp32 parity with the reference
            return tl.dot(x, y, acc, input_precision="ieee")
        return tl.dot(x, y, acc)  # bf16/fp16 tensor cores (or TF32), fp32 accumulation

    @triton.jit
    def _load_chunk(a_row_ptrs, mask_n, c_col_ptrs, mask_m, k, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                    DOT_FP32: tl.constexpr):
        """A[rows, k:k+BLOCK_D] ([BLOCK_N, BLOCK_D]) and C[cols, k:k+BLOCK_D]^T ([BLOCK_D, BLOCK_M])."""
        offs_d = k + tl.arange(0, BLOCK_D)
        if EVEN_D:
            a = tl.load(a_row_ptrs + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            c = tl.load(c_col_ptrs + offs_d[:, None], mask=mask_m[None, :], other=0.0)
        else:
            mask_d = offs_d < D
            a = tl.load(a_row_ptrs + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            c = tl.load(c_col_ptrs + offs_d[:, None], mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        if DOT_FP32:  # interpreter (bf16 tl.dot is broken there) and fp32 inputs
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        return a, c

    @triton.jit
    def _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr,
                  IEEE_FP32: tl.constexpr):
        """s = A[rows] @ C[cols]^T as a [BLOCK_N, BLOCK_M] fp32 tile, looping D in BLOCK_D chunks.

        a_row_ptrs: [BLOCK_N, 1] row starts; c_col_ptrs: [1, BLOCK_M] column starts (stride 1 along D).
        """
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            a, c = _load_chunk(a_row_ptrs, mask_n, c_col_ptrs, mask_m, k, D, BLOCK_D, EVEN_D, DOT_FP32)
            acc = _dot_acc(a, c, acc, IEEE_FP32)
        return acc

    @triton.jit
    def _family_tile(s, offs_m, col_end, pos, neg_scale, inv_temp, weight_gamma, tau_min, tau_delta, tau_gamma,
                     WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr):
        """(z2, wf, 1/tau) of a tile: w_ij exp(s_ij / tau_ij) = wf_ij * exp2(z2_ij), z2 = s / tau * log2(e).

        w and tau come from the stop-gradient s clamped to [-1, 1]; the positive column (offs_m == pos) gets
        w = 1, tau = temperature. Weights stay multiplicative (u, u*u, or exp2(gamma log2 u) for other
        exponents) to spare special-function units; zero-weight terms and columns >= col_end get z2 = -inf so
        they leave the running max and never produce inf * 0. wf / 1/tau are scalars when constant.
        """
        is_pos = pos[:, None] == offs_m[None, :]
        sc = tl.minimum(tl.maximum(s, -1.0), 1.0)
        if TAU_POW != 0:
            v = (1.0 + sc) * 0.5
            if TAU_POW == 1:
                v_pow = v
            elif TAU_POW == 2:
                v_pow = v * v
            else:  # v^gamma = exp2(gamma * log2 v); v = 0 -> 0
                v_pow = tl.exp2(tau_gamma * tl.log2(v))
            inv_tau = tl.where(is_pos, inv_temp, 1.0 / (tau_min + tau_delta * v_pow))
        else:
            inv_tau = inv_temp
        z2 = s * (inv_tau * 1.4426950408889634)  # log2(e) folded into the scale
        if WEIGHT_POW != 0:
            u = (1.0 - sc) * 0.5  # 0 at s = 1: the term vanishes
            if WEIGHT_POW == 1:
                w = u
            elif WEIGHT_POW == 2:
                w = u * u
            else:
                w = tl.exp2(weight_gamma * tl.log2(u))
            if HAS_NLS:
                w = w * neg_scale[:, None]
            wf = tl.where(is_pos, 1.0, w)
            z2 = tl.where(wf > 0.0, z2, float("-inf"))
        elif HAS_NLS:
            wf = tl.where(is_pos, 1.0, neg_scale[:, None])
            z2 = tl.where(wf > 0.0, z2, float("-inf"))
        else:
            wf = 1.0
        z2 = tl.where(offs_m[None, :] < col_end, z2, float("-inf"))
        return z2, wf, inv_tau

    @triton.jit
    def _online_lse(s, m_i, l_i, offs_m, col_end, pos, neg_scale, inv_temp, weight_gamma, tau_min, tau_delta,
                    tau_gamma, WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr):
        """Fold one tile into the running base-2 max m_i and fp32 sum l_i = sum wf * exp2(z2 - m_i)."""
        z2, wf, inv_tau = _family_tile(s, offs_m, col_end, pos, neg_scale, inv_temp, weight_gamma, tau_min,
                                       tau_delta, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
        m_new = tl.maximum(m_i, tl.max(z2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z2 - m_safe[:, None]) * wf, 1)
        return m_new, l_i

    @triton.jit
    def _fwd_kernel(A, C, POS, NLS, LSE_PART, N, M, D, stride_a, stride_c, cols_per_split,
                    inv_temp, weight_gamma, tau_min, tau_delta, tau_gamma,
                    WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr, HAS_POS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, IEEE_FP32: tl.constexpr,
                    FLAT: tl.constexpr):
        """One program: BLOCK_N rows x the columns of split pid(1); writes that split's partial lse.

        FLAT runs (column tile, D chunk) pairs as one loop with the epilogue under ``if`` (as Triton's
        persistent matmul does), so the software pipeline does not drain between column tiles.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        pos = tl.load(POS + offs_n, mask=mask_n, other=-1) if HAS_POS else offs_n
        neg_scale = tl.exp(tl.load(NLS + offs_n, mask=mask_n, other=0.0)) if HAS_NLS else 1.0
        a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a  # int64: N * D may exceed 2^31
        col_start = pid_s * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, M)
        m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max (base 2)
        l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of wf * exp2(z2 - m_i), fp32
        if FLAT:
            k_iters = tl.cdiv(D, BLOCK_D)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for it in range(0, tl.cdiv(col_end - col_start, BLOCK_M) * k_iters):
                tile = it // k_iters
                kk = it - tile * k_iters
                offs_m = col_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_m = offs_m < col_end
                c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
                a, c = _load_chunk(a_row_ptrs, mask_n, c_col_ptrs, mask_m, kk * BLOCK_D, D, BLOCK_D, EVEN_D,
                                   DOT_FP32)
                acc = _dot_acc(a, c, acc, IEEE_FP32)
                if kk == k_iters - 1:
                    m_i, l_i = _online_lse(acc, m_i, l_i, offs_m, col_end, pos, neg_scale, inv_temp,
                                           weight_gamma, tau_min, tau_delta, tau_gamma, WEIGHT_POW, TAU_POW,
                                           HAS_NLS)
                    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            for start_m in range(col_start, col_end, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                mask_m = offs_m < col_end
                c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
                s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                              DOT_FP32, IEEE_FP32)
                m_i, l_i = _online_lse(s, m_i, l_i, offs_m, col_end, pos, neg_scale, inv_temp, weight_gamma,
                                       tau_min, tau_delta, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = (m_safe + tl.log2(l_i)) * 0.6931471805599453  # back to natural log; l_i = 0 -> -inf
        tl.store(LSE_PART + pid_s * N + offs_n, lse, mask=mask_n)

    @triton.jit
    def _grad_tile(s, offs_m, col_end, pos, neg_scale, lse2, g, inv_temp, weight_gamma, tau_min, tau_delta,
                   tau_gamma, WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr):
        """G = g_i * p_ij / tau_ij with p_ij = wf_ij exp2(z2_ij - lse2_i): d(sum_i g_i lse_i) / d s_ij."""
        z2, wf, inv_tau = _family_tile(s, offs_m, col_end, pos, neg_scale, inv_temp, weight_gamma, tau_min,
                                       tau_delta, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
        return tl.exp2(z2 - lse2[:, None]) * wf * (inv_tau * g[:, None])

    @triton.jit
    def _bwd_da_kernel(A, C, POS, NLS, LSE, GRAD, DA, N, M, D, stride_a, stride_c, stride_da,
                       inv_temp, weight_gamma, tau_min, tau_delta, tau_gamma,
                       WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr, HAS_POS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr,
                       IEEE_FP32: tl.constexpr):
        """da[rows, d-chunk] = sum_j G_ij c_j[d-chunk]; one program per (row block, D-output chunk)."""
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        mask_do = offs_do < D
        pos = tl.load(POS + offs_n, mask=mask_n, other=-1) if HAS_POS else offs_n
        neg_scale = tl.exp(tl.load(NLS + offs_n, mask=mask_n, other=0.0)) if HAS_NLS else 1.0
        lse2 = tl.load(LSE + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
        g = tl.load(GRAD + offs_n, mask=mask_n, other=0.0)
        a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a
        acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
        for start_m in range(0, M, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
            s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                          DOT_FP32, IEEE_FP32)
            grad_s = _grad_tile(s, offs_m, M, pos, neg_scale, lse2, g, inv_temp, weight_gamma, tau_min,
                                tau_delta, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
            c_out = tl.load(C + offs_m.to(tl.int64)[:, None] * stride_c + offs_do[None, :],
                            mask=mask_m[:, None] & mask_do[None, :], other=0.0)
            if DOT_FP32:
                acc = _dot_acc(grad_s, c_out.to(tl.float32), acc, IEEE_FP32)
            else:
                acc = tl.dot(grad_s.to(c_out.dtype), c_out, acc)
        tl.store(DA + offs_n.to(tl.int64)[:, None] * stride_da + offs_do[None, :],
                 acc.to(DA.dtype.element_ty), mask=mask_n[:, None] & mask_do[None, :])

    @triton.jit
    def _bwd_dc_kernel(A, C, POS, NLS, LSE, GRAD, DC, N, M, D, stride_a, stride_c, stride_dc,
                       inv_temp, weight_gamma, tau_min, tau_delta, tau_gamma,
                       WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr, HAS_POS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr,
                       IEEE_FP32: tl.constexpr):
        """dc[cols, d-chunk] = sum_i G_ij a_i[d-chunk]; one program per (column block, D-output chunk)."""
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        mask_do = offs_do < D
        c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
        acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            pos = tl.load(POS + offs_n, mask=mask_n, other=-1) if HAS_POS else offs_n
            neg_scale = tl.exp(tl.load(NLS + offs_n, mask=mask_n, other=0.0)) if HAS_NLS else 1.0
            lse2 = tl.load(LSE + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
            g = tl.load(GRAD + offs_n, mask=mask_n, other=0.0)  # masked rows: g = 0 -> no contribution
            a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a
            s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                          DOT_FP32, IEEE_FP32)
            grad_s = _grad_tile(s, offs_m, M, pos, neg_scale, lse2, g, inv_temp, weight_gamma, tau_min,
                                tau_delta, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
            a_out = tl.load(a_row_ptrs + offs_do[None, :], mask=mask_n[:, None] & mask_do[None, :], other=0.0)
            if DOT_FP32:
                acc = _dot_acc(tl.trans(grad_s), a_out.to(tl.float32), acc, IEEE_FP32)
            else:
                acc = tl.dot(tl.trans(grad_s.to(a_out.dtype)), a_out, acc)
        tl.store(DC + offs_m.to(tl.int64)[:, None] * stride_dc + offs_do[None, :],
                 acc.to(DC.dtype.element_ty), mask=mask_m[:, None] & mask_do[None, :])

    @triton.jit
    def _bwd_grad_kernel(A, C, POS, NLS, LSE, GRAD, G, N, M, D, stride_a, stride_c, stride_g, row0,
                         inv_temp, weight_gamma, tau_min, tau_delta, tau_gamma,
                         WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr, HAS_POS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, IEEE_FP32: tl.constexpr):
        """Stripe mode: one [BLOCK_N, BLOCK_M] tile of G for rows [row0, N) into G[(i - row0), j]."""
        offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        mask_m = offs_m < M
        pos = tl.load(POS + offs_n, mask=mask_n, other=-1) if HAS_POS else offs_n
        neg_scale = tl.exp(tl.load(NLS + offs_n, mask=mask_n, other=0.0)) if HAS_NLS else 1.0
        lse2 = tl.load(LSE + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
        g = tl.load(GRAD + offs_n, mask=mask_n, other=0.0)
        a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a
        c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
        s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                      DOT_FP32, IEEE_FP32)
        grad_s = _grad_tile(s, offs_m, M, pos, neg_scale, lse2, g, inv_temp, weight_gamma, tau_min, tau_delta,
                            tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
        g_ptrs = G + (offs_n - row0).to(tl.int64)[:, None] * stride_g + offs_m[None, :]
        tl.store(g_ptrs, grad_s.to(G.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
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


def _hyper_args(hp):
    temperature, weight_gamma, tau_min, tau_max, tau_gamma = hp
    has_tau = tau_min is not None
    args = (1.0 / temperature, weight_gamma, tau_min if has_tau else 0.0,
            (tau_max - tau_min) if has_tau else 0.0, tau_gamma)
    flags = dict(WEIGHT_POW=_pow_mode(weight_gamma), TAU_POW=_pow_mode(tau_gamma) if has_tau else 0)
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


def _triton_forward(a_ND, c_MD, pos_N, nls_N, hp, cfg) -> Tensor:
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
    hyper, flags = _hyper_args(hp)
    _COMPILED["fwd"] = _fwd_kernel[(row_blocks, splits)](
        a_ND, c_MD, pos_N if pos_N is not None else lse_part, nls_N if nls_N is not None else lse_part, lse_part,
        n_rows, n_cols, dim, a_ND.stride(0), c_MD.stride(0), cols_per_split, *hyper, HAS_NLS=nls_N is not None,
        HAS_POS=pos_N is not None, **flags,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=dim % block_d == 0, **_dot_flags(a_ND),
        FLAT=bool(cfg["fwd_flat"]), num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    # merge the column splits' partial lse (tiny: splits x N); exact for -inf partials
    return lse_part[0] if splits == 1 else torch.logsumexp(lse_part, dim=0)


def _triton_backward(a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, hp, cfg, need_da, need_dc):
    n_rows, dim = a_ND.shape
    n_cols = c_MD.shape[0]
    hyper, flags = _hyper_args(hp)
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
            _COMPILED["da"] = _bwd_da_kernel[(triton.cdiv(n_rows, block_n), triton.cdiv(dim, block_do))](
                a_ND, c_MD, pos_N, nls_arg, lse_N, grad_N, da, n_rows, n_cols, dim, a_ND.stride(0),
                c_MD.stride(0), da.stride(0), *hyper, **launch)
        if need_dc:
            _COMPILED["dc"] = _bwd_dc_kernel[(triton.cdiv(n_cols, block_m), triton.cdiv(dim, block_do))](
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
        _COMPILED["grad"] = _bwd_grad_kernel[(triton.cdiv(rows, block_n), triton.cdiv(n_cols, block_m))](
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
    def forward(ctx, anchors, candidates, pos_N, nls_N, hp, cfg):
        a_ND = anchors.detach().contiguous()
        c_MD = candidates.detach().contiguous()
        with torch.cuda.device(a_ND.device) if a_ND.is_cuda else contextlib.nullcontext():
            lse_N = _triton_forward(a_ND, c_MD, pos_N, nls_N, hp, cfg)
        ctx.save_for_backward(a_ND, c_MD, pos_N, nls_N, lse_N)
        ctx.hp, ctx.cfg = hp, cfg
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        a_ND, c_MD, pos_N, nls_N, lse_N = ctx.saved_tensors
        need_da, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_da or need_dc):
            return None, None, None, None, None, None
        grad_N = grad_lse_N.detach().to(torch.float32).contiguous()
        with torch.cuda.device(a_ND.device) if a_ND.is_cuda else contextlib.nullcontext():
            da, dc = _triton_backward(a_ND, c_MD, pos_N, nls_N, lse_N, grad_N, ctx.hp, ctx.cfg, need_da,
                                      need_dc)
        return da, dc, None, None, None, None


def triton_sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                           weight_gamma: float = 0.0, tau_min: float | None = None,
                           tau_max: float | None = None, tau_gamma: float = 1.0,
                           positive_index: Tensor | None = None, neg_log_scale: Tensor | None = None,
                           config: dict | None = None) -> Tensor:
    """Triton ``sim_softmax_lse`` (float32 (N,) lse). ``config`` overrides ``default_triton_config`` keys."""
    if not _HAS_TRITON:
        raise ValueError("backend='triton' requested but triton is not installed")
    if not anchors.is_cuda and not _interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported")
    pos_N, nls_N = _check_inputs(
        anchors, candidates, temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
        tau_max=tau_max, tau_gamma=tau_gamma, positive_index=positive_index, neg_log_scale=neg_log_scale,
        default_index=False)
    if anchors.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"backend='triton' supports float32/float16/bfloat16, got {anchors.dtype}")
    cfg = default_triton_config(anchors, candidates)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown triton config keys {sorted(unknown)}")
        cfg.update(config)
    hp = (float(temperature), float(weight_gamma), None if tau_min is None else float(tau_min),
          None if tau_max is None else float(tau_max), float(tau_gamma))
    if pos_N is not None:  # None: positive of row i is column i, computed in-kernel
        pos_N = pos_N.to(torch.int32).contiguous()  # M < 2^31 columns
    if nls_N is not None:
        nls_N = nls_N.to(torch.float32).contiguous()
    return _TritonSimSoftmaxLSE.apply(anchors, candidates, pos_N, nls_N, hp, cfg)


# ----------------------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, anchors: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        on_gpu = isinstance(anchors, Tensor) and anchors.is_cuda and anchors.dtype != torch.float64
        return "triton" if on_gpu and _HAS_TRITON else "chunked"
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
    if resolved == "triton":
        return triton_sim_softmax_lse(anchors, candidates, **kwargs)
    from kernels.chunked import chunked_sim_softmax_lse  # lazy: chunked imports this module

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
