"""Fused similarity-softmax op for contrastive losses: ``sim_softmax_lse`` and its torch reference.

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

``reduction="mean"|"sum"`` returns a scalar instead (what every loss takes), which lets the Triton backend
produce the gradient during the forward. ``workspace_bytes`` (default 256 MiB) bounds the one N x M buffer a
backend may keep from forward to backward; beyond it every backend recomputes similarity tiles:

    path (backend)            FLOPs   kept between forward and backward
    kept logits (chunked, CPU) 6NMD   p (or p / tau), N x M in fp32, when it fits the workspace
    keep (Triton, D > 256)     6NMD   gradient tiles, N x M in the input dtype, when they fit
    forward-grad (Triton)      6NMD   da, dc (reduction mean/sum; stripes of rows through the workspace)
    recompute (every backend)  8NMD   lse (N,) only

Modules: ``dispatch`` (the functional, BACKENDS), ``family`` (argument checks and the family in torch,
shared by every backend; the workspace default), ``reference`` (dense torch, ``upcast=``), ``chunked``
(torch: kept-logits and recompute paths, ``mean_negative_weight``), ``triton_op`` (recompute path, entry
points), ``triton_keep`` (keep / forward-grad paths), ``triton_launch`` (configurations, launch helpers) and
``triton_kernels`` (the kernels): the Triton backend, present when triton is.
"""

from .chunked import mean_negative_weight
from .dispatch import BACKENDS, sim_softmax_lse, triton_available
from .reference import sim_softmax_lse_ref

__all__ = [
    "BACKENDS",
    "mean_negative_weight",
    "sim_softmax_lse",
    "sim_softmax_lse_ref",
    "triton_available",
]
