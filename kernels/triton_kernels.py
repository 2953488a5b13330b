"""Triton kernels of the op: forward lse, the two recompute backward modes and the keep kernels (spec in
``kernels/__init__.py``).

Legend: N anchors/rows, M candidates/columns, D embedding dim; A (N x D), C (M x D) row-major, stride 1
along D. Launchers and autograd.Functions are in ``kernels/triton_op.py`` (recompute) and
``kernels/triton_keep.py`` (keep); this module is imported only when triton is, and TRITON_INTERPRET is read
when the kernels below are decorated.

Numerics and layout (flash-attention style; only the stripe and keep modes write N x M data, and only within
the workspace):
- forward: a program owns BLOCK_N rows and one split of the columns; per BLOCK_M column tile it computes
  s with ``tl.dot`` over D in BLOCK_D chunks (fp32 accumulation; bf16/fp16 tensor cores, IEEE fp32 for fp32
  inputs unless TF32 is allowed), derives w and tau in-kernel (``_family_tile``), and keeps a running max
  and sum in base 2 (``LOG2E`` folded into the temperature constants on the host, ``exp2``; weights
  multiply, so gamma in {1, 2} costs no special function and zero weights drop out of the max). Column
  splits (so that small N still fills the GPU) write partial lse (splits x N); torch merges them. Saved for
  backward: lse (N,).
- backward "fused" (D <= 256): deterministic two kernels recompute tiles; da over row blocks, dc over
  column blocks, each holding a [block, BLOCK_DO] fp32 accumulator (D is split in BLOCK_DO chunks).
- backward "stripe" (D > 256 on GPU, where a full-D fp32 accumulator does not fit in registers): a kernel
  writes G = g p / tau for a stripe of rows (columns when M > N) into a bounded workspace
  (``workspace_bytes``, not O(N M)), then cuBLAS computes the complete side per stripe (da = G C, or dc =
  G^T A when striping columns) and accumulates the other in fp32 across stripes.
- keep (``fwd_keep_kernel`` + ``keep_fixup_kernel``, kernel v2): the forward itself stores the tiles of
  p / tau, relative to a per-row reference, for the GEMMs of ``kernels/triton_keep.py``: no recompute.
- pointer offsets are int64 (row * stride may exceed 2^31). Under TRITON_INTERPRET=1 the launcher picks small
  fixed blocks (no autotune) and tiles are cast to fp32 before ``tl.dot`` (bf16 dot is broken there).
"""

import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E): the kernels work in base 2 because exp2 is the hardware instruction (ex2.approx)
# and exp is not. LOG2E is folded into the temperature constants on the host (``_hyper_args``: inv_temp2 =
# LOG2E / temperature, tau_min2 = tau_min * LN2, tau_delta2 = (tau_max - tau_min) * LN2, so that
# inv_tau2 = 1 / (tau_min2 + tau_delta2 v) = LOG2E / tau and z2 = s * inv_tau2 costs one multiply per element);
# the saved lse is multiplied by LOG2E when a backward reloads it, the upstream grad by LN2 (d z / d s = 1 / tau
# = inv_tau2 * LN2), and LN2 takes the base-2 lse back to the natural log. tl.constexpr: jit code may only
# read constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
def _row_family(POS, NLS, offs_n, mask_n, HAS_POS: tl.constexpr, HAS_NLS: tl.constexpr):
    """Per-row positive column p(i) (the row index without POS) and negative weight scale exp(nls_i)."""
    pos = tl.load(POS + offs_n, mask=mask_n, other=-1) if HAS_POS else offs_n
    neg_scale = tl.exp(tl.load(NLS + offs_n, mask=mask_n, other=0.0)) if HAS_NLS else 1.0
    return pos, neg_scale


@triton.jit
def _row_grad_inputs(POS, NLS, LSE, GRAD, offs_n, mask_n, HAS_POS: tl.constexpr, HAS_NLS: tl.constexpr):
    """``_row_family`` plus the saved lse in base 2 and the upstream grad (0 on masked rows: no contribution)."""
    pos, neg_scale = _row_family(POS, NLS, offs_n, mask_n, HAS_POS, HAS_NLS)
    lse2 = tl.load(LSE + offs_n, mask=mask_n, other=0.0) * LOG2E
    g = tl.load(GRAD + offs_n, mask=mask_n, other=0.0) * LN2  # with inv_tau2: g / tau = g LN2 inv_tau2
    return pos, neg_scale, lse2, g


@triton.jit
def _family_tile(s, offs_m, col_end, pos, neg_scale, inv_temp2, weight_gamma, tau_min2, tau_delta2, tau_gamma,
                 WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr):
    """(z2, wf, inv_tau2) of a tile: w_ij exp(s_ij / tau_ij) = wf_ij * exp2(z2_ij), z2 = s * inv_tau2,
    inv_tau2 = log2(e) / tau (the constants arrive with LOG2E folded in, see LOG2E above).

    w and tau come from the stop-gradient s clamped to [-1, 1]; the positive column (offs_m == pos) gets
    w = 1, tau = temperature. Weights stay multiplicative (u, u*u, or exp2(gamma log2 u) for other
    exponents) to spare special-function units; zero-weight terms and columns >= col_end get z2 = -inf so
    they leave the running max and never produce inf * 0. wf / inv_tau2 are scalars when constant.
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
        inv_tau2 = tl.where(is_pos, inv_temp2, 1.0 / (tau_min2 + tau_delta2 * v_pow))
    else:
        inv_tau2 = inv_temp2
    z2 = s * inv_tau2
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
    return z2, wf, inv_tau2


@triton.jit
def _online_lse(s, m_i, l_i, offs_m, col_end, pos, neg_scale, inv_temp2, weight_gamma, tau_min2, tau_delta2,
                tau_gamma, WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr):
    """Fold one tile into the running base-2 max m_i and fp32 sum l_i = sum wf * exp2(z2 - m_i)."""
    z2, wf, _ = _family_tile(s, offs_m, col_end, pos, neg_scale, inv_temp2, weight_gamma, tau_min2,
                             tau_delta2, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
    m_new = tl.maximum(m_i, tl.max(z2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z2 - m_safe[:, None]) * wf, 1)
    return m_new, l_i


@triton.jit
def fwd_kernel(A, C, POS, NLS, LSE_PART, N, M, D, stride_a, stride_c, cols_per_split,
                inv_temp2, weight_gamma, tau_min2, tau_delta2, tau_gamma,
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
    pos, neg_scale = _row_family(POS, NLS, offs_n, mask_n, HAS_POS, HAS_NLS)
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
                m_i, l_i = _online_lse(acc, m_i, l_i, offs_m, col_end, pos, neg_scale, inv_temp2,
                                       weight_gamma, tau_min2, tau_delta2, tau_gamma, WEIGHT_POW, TAU_POW,
                                       HAS_NLS)
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        for start_m in range(col_start, col_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < col_end
            c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
            s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                          DOT_FP32, IEEE_FP32)
            m_i, l_i = _online_lse(s, m_i, l_i, offs_m, col_end, pos, neg_scale, inv_temp2, weight_gamma,
                                   tau_min2, tau_delta2, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = (m_safe + tl.log2(l_i)) * LN2  # l_i = 0 -> -inf
    tl.store(LSE_PART + pid_s * N + offs_n, lse, mask=mask_n)


@triton.jit
def _grad_tile(s, offs_m, col_end, pos, neg_scale, lse2, g, inv_temp2, weight_gamma, tau_min2, tau_delta2,
               tau_gamma, WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr):
    """G = g_i * p_ij / tau_ij with p_ij = wf_ij exp2(z2_ij - lse2_i): d(sum_i g_i lse_i) / d s_ij
    (``g`` arrives multiplied by LN2, so that g LN2 * inv_tau2 = g / tau)."""
    z2, wf, inv_tau2 = _family_tile(s, offs_m, col_end, pos, neg_scale, inv_temp2, weight_gamma, tau_min2,
                                    tau_delta2, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
    return tl.exp2(z2 - lse2[:, None]) * wf * (inv_tau2 * g[:, None])


@triton.jit
def bwd_da_kernel(A, C, POS, NLS, LSE, GRAD, DA, N, M, D, stride_a, stride_c, stride_da,
                   inv_temp2, weight_gamma, tau_min2, tau_delta2, tau_gamma,
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
    pos, neg_scale, lse2, g = _row_grad_inputs(POS, NLS, LSE, GRAD, offs_n, mask_n, HAS_POS, HAS_NLS)
    a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
        s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                      DOT_FP32, IEEE_FP32)
        grad_s = _grad_tile(s, offs_m, M, pos, neg_scale, lse2, g, inv_temp2, weight_gamma, tau_min2,
                            tau_delta2, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
        c_out = tl.load(C + offs_m.to(tl.int64)[:, None] * stride_c + offs_do[None, :],
                        mask=mask_m[:, None] & mask_do[None, :], other=0.0)
        if DOT_FP32:
            acc = _dot_acc(grad_s, c_out.to(tl.float32), acc, IEEE_FP32)
        else:
            acc = tl.dot(grad_s.to(c_out.dtype), c_out, acc)
    tl.store(DA + offs_n.to(tl.int64)[:, None] * stride_da + offs_do[None, :],
             acc.to(DA.dtype.element_ty), mask=mask_n[:, None] & mask_do[None, :])


@triton.jit
def bwd_dc_kernel(A, C, POS, NLS, LSE, GRAD, DC, N, M, D, stride_a, stride_c, stride_dc,
                   inv_temp2, weight_gamma, tau_min2, tau_delta2, tau_gamma,
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
        pos, neg_scale, lse2, g = _row_grad_inputs(POS, NLS, LSE, GRAD, offs_n, mask_n, HAS_POS, HAS_NLS)
        a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a
        s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                      DOT_FP32, IEEE_FP32)
        grad_s = _grad_tile(s, offs_m, M, pos, neg_scale, lse2, g, inv_temp2, weight_gamma, tau_min2,
                            tau_delta2, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
        a_out = tl.load(a_row_ptrs + offs_do[None, :], mask=mask_n[:, None] & mask_do[None, :], other=0.0)
        if DOT_FP32:
            acc = _dot_acc(tl.trans(grad_s), a_out.to(tl.float32), acc, IEEE_FP32)
        else:
            acc = tl.dot(tl.trans(grad_s.to(a_out.dtype)), a_out, acc)
    tl.store(DC + offs_m.to(tl.int64)[:, None] * stride_dc + offs_do[None, :],
             acc.to(DC.dtype.element_ty), mask=mask_m[:, None] & mask_do[None, :])


@triton.jit
def bwd_grad_kernel(A, C, POS, NLS, LSE, GRAD, G, N, M, D, stride_a, stride_c, stride_g, row0, col0,
                     inv_temp2, weight_gamma, tau_min2, tau_delta2, tau_gamma,
                     WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr, HAS_POS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, IEEE_FP32: tl.constexpr):
    """Stripe mode: one [BLOCK_N, BLOCK_M] tile of G for rows [row0, N) x columns [col0, M) (N, M: the
    stripe's ends) into G[i - row0, j - col0]."""
    offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = col0 + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    pos, neg_scale, lse2, g = _row_grad_inputs(POS, NLS, LSE, GRAD, offs_n, mask_n, HAS_POS, HAS_NLS)
    a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a
    c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
    s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D,
                  DOT_FP32, IEEE_FP32)
    grad_s = _grad_tile(s, offs_m, M, pos, neg_scale, lse2, g, inv_temp2, weight_gamma, tau_min2, tau_delta2,
                        tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
    g_ptrs = G + (offs_n - row0).to(tl.int64)[:, None] * stride_g + (offs_m - col0)[None, :]
    tl.store(g_ptrs, grad_s.to(G.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def fwd_keep_kernel(A, C, POS, NLS, P, REFS, REF_S, L_S, N, M, D, stride_a, stride_c, stride_p, row0, n_tiles,
                    cols_per_split, inv_temp2, weight_gamma, tau_min2, tau_delta2, tau_gamma, inv_tau2_max,
                    WEIGHT_POW: tl.constexpr, TAU_POW: tl.constexpr, HAS_NLS: tl.constexpr, HAS_POS: tl.constexpr,
                    HEADROOM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, IEEE_FP32: tl.constexpr):
    """Keep mode: BLOCK_N rows of the stripe [row0, N) x the columns of split pid(1). Writes every tile of
    P_ij = wf_ij (inv_tau2_ij / inv_tau2_max) exp2(z2_ij - ref_is) into P[i - row0, j] (input dtype), and
    per (split, row) the reference ref_is and l_is = sum_j wf exp2(z2 - ref_is) into REF_S / L_S.

    ref_is trails the split's running max by at most HEADROOM (base 2): it moves only when a tile's max
    exceeds it by more than that, so stored values are <= 2^HEADROOM (fp16-safe for 8) and values near the
    row max keep full precision. REFS[i - row0, t] records the reference tile t was written with;
    ``keep_fixup_kernel`` rescales the (rare) tiles whose reference moved later. The launcher merges the
    splits: lse2_i = log2 sum_s l_is 2^ref_is, and G_ij = g_i p_ij / tau_ij = g_i f_is P_ij with
    f_is = inv_tau2_max LN2 exp2(ref_is - lse2_i).
    """
    pid_s = tl.program_id(1)
    offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pos, neg_scale = _row_family(POS, NLS, offs_n, mask_n, HAS_POS, HAS_NLS)
    a_row_ptrs = A + offs_n.to(tl.int64)[:, None] * stride_a
    p_row_ptrs = P + (offs_n - row0).to(tl.int64)[:, None] * stride_p
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, M)
    ref = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum of wf * exp2(z2 - ref)
    for start_m in range(col_start, col_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < col_end
        c_col_ptrs = C + offs_m.to(tl.int64)[None, :] * stride_c
        s = _sim_tile(a_row_ptrs, mask_n, c_col_ptrs, mask_m, D, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D, DOT_FP32,
                      IEEE_FP32)
        z2, wf, inv_tau2 = _family_tile(s, offs_m, col_end, pos, neg_scale, inv_temp2, weight_gamma, tau_min2,
                                        tau_delta2, tau_gamma, WEIGHT_POW, TAU_POW, HAS_NLS)
        tile_max = tl.max(z2, 1)
        ref_new = tl.where(tile_max > ref + HEADROOM, tile_max, ref)
        # -inf -> finite: exp2(-inf) = 0 (l was 0); unchanged (also -inf -> -inf): exactly 1
        l_i = l_i * tl.where(ref_new == ref, 1.0, tl.exp2(ref - ref_new))
        ref_safe = tl.where(ref_new == float("-inf"), 0.0, ref_new)  # all -inf so far: every term is 0
        e = tl.exp2(z2 - ref_safe[:, None]) * wf
        l_i += tl.sum(e, 1)
        ref = ref_new
        tl.store(p_row_ptrs + offs_m[None, :], (e * (inv_tau2 / inv_tau2_max)).to(P.dtype.element_ty),
                 mask=mask_n[:, None] & mask_m[None, :])
        tl.store(REFS + (offs_n - row0).to(tl.int64) * n_tiles + start_m // BLOCK_M, ref, mask=mask_n)
    rows_in_stripe = N - row0
    tl.store(REF_S + pid_s * rows_in_stripe + (offs_n - row0), ref, mask=mask_n)
    tl.store(L_S + pid_s * rows_in_stripe + (offs_n - row0), l_i, mask=mask_n)


@triton.jit
def keep_fixup_kernel(P, REFS, REF_S, N, M, stride_p, row0, n_tiles, cols_per_split, BLOCK_N: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    """P[rows, tile t] *= exp2(ref_t - ref_final) for tiles written before their rows' reference moved
    (one program per (row block, tile); the others read 2 BLOCK_N floats and exit)."""
    offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    mask_n = offs_n < N
    split = (t * BLOCK_M) // cols_per_split
    ref_t = tl.load(REFS + (offs_n - row0).to(tl.int64) * n_tiles + t, mask=mask_n, other=0.0)
    ref_end = tl.load(REF_S + split * (N - row0) + (offs_n - row0), mask=mask_n, other=0.0)
    if tl.max(tl.where(mask_n & (ref_end > ref_t), 1, 0), 0) > 0:
        factor = tl.where(ref_end > ref_t, tl.exp2(ref_t - ref_end), 1.0)  # ref_t = -inf: stored 0 anyway
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        ptrs = P + (offs_n - row0).to(tl.int64)[:, None] * stride_p + offs_m[None, :]
        mask = mask_n[:, None] & (offs_m < M)[None, :]
        tile = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (tile * factor[:, None]).to(P.dtype.element_ty), mask=mask)
