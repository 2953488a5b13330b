"""The fused op's log-sum-exp with the family read from ANOTHER similarity: SoftCSE's ``weight_source=frozen``.

Legend: N rows (anchors), M columns (candidates), D dim of the trained embeddings, D' of the guide's, B a
block of columns. Same spec as ``kernels.sim_softmax_lse`` (``kernels/__init__.py``) except that the weights
and temperatures come from the guide similarity ``t_ij = <g_a_i, g_c_j>`` (e.g. a frozen copy of the initial
encoder on the same rows) instead of ``sg(s_ij)``::

    lse_i = log sum_j w(t_ij) exp(s_ij / tau(t_ij)),    positive column: w = 1, tau = temperature

``t`` carries no gradient (the guide is constant); ``d lse_i / d s_ij = p_ij / tau(t_ij)`` exactly as in the
kernel. The family functions are ``kernels.family``'s (one formula), applied to the guide tile; the walk over
column blocks is the chunked backend's: peak extra memory O(N x B + (N + M)(D + D')), never O(N x M). There is
no Triton version: this path is an option for experiments, not the hot path.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from trainer.kernels.chunked import default_block_size
from trainer.kernels.family import check_family, check_tensors, log_weight_inv_tau


class FrozenViews(NamedTuple):
    """A frozen encoder's embeddings of one step's rows (``trainer/frozen.py`` makes them, eval mode)."""

    anchors: Tensor
    """Local sentences, N x D' (in eval mode also their identical twins: same text, no dropout)."""
    candidates: Optional[Tensor] = None
    """Every rank's sentences gathered in rank order, M x D' (the guide of SoftCSE's weights)."""
    fraternal: Optional[Tensor] = None
    """Local fraternal views, N x D' (IFTCL's innate margin)."""

    def innate_margin(self) -> Tensor:
        """d0_i = s0(a_i, I_i) - s0(a_i, F_i) (N,), the Twins margin of the pair under the frozen encoder; the
        identical twin's frozen embedding is the anchor's own (eval mode), so s0(a_i, I_i) = |e_i|^2 = 1."""
        if self.fraternal is None:
            raise ValueError("the innate margin needs the frozen embeddings of the fraternal views")
        a = self.anchors.detach()
        return (a * a).sum(dim=1) - (a * self.fraternal.detach()).sum(dim=1)


def _tile_logits(a_ND, c_BD, ga_ND, gc_BD, start, pos_idx_N, nls_N, family):
    """(logits_NB, 1/tau) of columns [start, start + B): s / tau(t) + log w(t)."""
    log_w_NB, inv_tau = log_weight_inv_tau(ga_ND @ gc_BD.T, family, pos_idx_N, start, nls_N)
    logits_NB = (a_ND @ c_BD.T).mul_(inv_tau)
    if log_w_NB is not None:
        logits_NB.add_(log_w_NB)
    return logits_NB, inv_tau


class _GuidedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, guide_a, guide_c, pos_idx_N, nls_N, block_size, family):
        dtype = torch.promote_types(anchors.dtype, torch.float32)
        a_ND, ga_ND = anchors.detach().to(dtype), guide_a.to(dtype)
        lse_N = torch.full((a_ND.shape[0],), float("-inf"), dtype=dtype, device=a_ND.device)
        for start in range(0, candidates.shape[0], block_size):
            end = start + block_size
            logits_NB, _ = _tile_logits(a_ND, candidates[start:end].detach().to(dtype), ga_ND,
                                        guide_c[start:end].to(dtype), start, pos_idx_N, nls_N, family)
            lse_N = torch.logaddexp(lse_N, torch.logsumexp(logits_NB, dim=1))
        ctx.save_for_backward(anchors, candidates, guide_a, guide_c, pos_idx_N, nls_N, lse_N)
        ctx.block_size, ctx.family = block_size, family
        return lse_N

    @staticmethod
    def backward(ctx, grad_lse_N):
        anchors, candidates, guide_a, guide_c, pos_idx_N, nls_N, lse_N = ctx.saved_tensors
        dtype = lse_N.dtype
        a_ND, ga_ND = anchors.to(dtype), guide_a.to(dtype)
        grad_N1 = grad_lse_N.to(dtype)[:, None]
        da_ND = torch.zeros_like(a_ND)
        dc_MD = torch.empty(candidates.shape, dtype=dtype, device=a_ND.device)
        for start in range(0, candidates.shape[0], ctx.block_size):
            end = start + ctx.block_size
            c_BD = candidates[start:end].to(dtype)
            logits_NB, inv_tau = _tile_logits(a_ND, c_BD, ga_ND, guide_c[start:end].to(dtype), start, pos_idx_N,
                                              nls_N, ctx.family)
            # G_ij = g_i p_ij / tau_ij; exp(-inf) = 0 for zero-weight terms
            g_NB = logits_NB.sub_(lse_N[:, None]).exp_().mul_(grad_N1).mul_(inv_tau)
            da_ND.addmm_(g_NB, c_BD)
            torch.mm(g_NB.T, a_ND, out=dc_MD[start:start + c_BD.shape[0]])
        return da_ND.to(anchors.dtype), dc_MD.to(candidates.dtype), None, None, None, None, None, None


def guided_lse(anchors: Tensor, candidates: Tensor, guide_anchors: Tensor, guide_candidates: Tensor, *,
               temperature: float = 0.05, weight_gamma: float = 0.0, tau_min: Optional[float] = None,
               tau_max: Optional[float] = None, tau_gamma: float = 1.0, positive_index: Optional[Tensor] = None,
               neg_log_scale: Optional[Tensor] = None, block_size: Optional[int] = None) -> Tensor:
    """Per-row lse (N,) with the family read from the guide similarity (module docstring); differentiable in
    ``anchors`` and ``candidates``, float32 (float64 for float64 inputs). Guide equal to the inputs gives
    exactly ``kernels.sim_softmax_lse``."""
    family = check_family(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min, tau_max=tau_max,
                          tau_gamma=tau_gamma)
    positive_index, neg_log_scale = check_tensors(anchors, candidates, positive_index, neg_log_scale)
    check_tensors(guide_anchors, guide_candidates, positive_index, candidates_name="guide_candidates")
    if guide_anchors.shape[0] != anchors.shape[0] or guide_candidates.shape[0] != candidates.shape[0]:
        raise ValueError(f"the guide must have the inputs' rows: N={anchors.shape[0]}, M={candidates.shape[0]}; "
                         f"got {guide_anchors.shape[0]} and {guide_candidates.shape[0]}")
    block = block_size or default_block_size(anchors.shape[0], candidates.shape[0])
    return _GuidedLSE.apply(anchors, candidates, guide_anchors.detach(), guide_candidates.detach(), positive_index,
                            neg_log_scale, block, family)
