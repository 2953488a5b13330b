"""Dense torch reference of the op (spec in ``kernels/__init__.py``), in the style of the Triton tutorial's
``layer_norm_ref`` and flash-attention's ``attention_ref(..., upcast=)``.

It materialises the N x M logits and lets autograd differentiate them (w and tau are detached), so it is the
simplest statement of the math: the "reference" backend, the tests' and the benchmark's torch baseline.
``upcast`` picks what it is a reference FOR:

- ``upcast=True``: computed in float64, returned in the op's lse dtype (float32; float64 for float64
  inputs). The truth side of flash-attention's rule ``err(kernel, fp64 ref) <= 2 err(torch same dtype, fp64
  ref)``: float64 and not float32 so that it stays well below the error of an fp32 kernel (tests hold
  those to 1e-5) and so that ``torch.autograd.gradcheck`` can run on it.
- ``upcast=False``: computed and returned in the input dtype (bf16 stays bf16, including log w and 1/tau):
  the "torch in the same dtype" side of that rule, and the naive baseline of ``benchmarks/kernel.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .family import Exclude, Family, check_exclude, check_family, check_tensors, log_weight_inv_tau


def dense_lse(anchors: Tensor, candidates: Tensor, family: Family, positive_index_N: Tensor,
              neg_log_scale_N: Optional[Tensor], compute_dtype: torch.dtype,
              exclude: Optional[Exclude] = None) -> Tensor:
    """lse (N,) in ``compute_dtype`` from checked inputs (``check_family`` / ``check_tensors`` / ``check_exclude``)."""
    sim_NM = anchors.to(compute_dtype) @ candidates.to(compute_dtype).T
    if neg_log_scale_N is not None:
        neg_log_scale_N = neg_log_scale_N.to(compute_dtype)
    log_w_NM, inv_tau_NM = log_weight_inv_tau(sim_NM, family, positive_index_N, 0, neg_log_scale_N, exclude)
    logits_NM = sim_NM * inv_tau_NM
    if log_w_NM is not None:
        logits_NM = logits_NM + log_w_NM
    return torch.logsumexp(logits_NM, dim=1)


def sim_softmax_lse_ref(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                        weight_gamma: float = 0.0, tau_min: Optional[float] = None,
                        tau_max: Optional[float] = None, tau_gamma: float = 1.0,
                        positive_index: Optional[Tensor] = None, neg_log_scale: Optional[Tensor] = None,
                        upcast: bool = True, exclude: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Dense reference lse (N,): float64 math returned as float32 (float64 inputs: float64) when
    ``upcast``, else math and result in the input dtype. Input gradients have the input dtype."""
    family = check_family(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
                          tau_max=tau_max, tau_gamma=tau_gamma)
    positive_index, neg_log_scale = check_tensors(anchors, candidates, positive_index, neg_log_scale)
    keys = check_exclude(exclude, anchors.shape[0], candidates.shape[0], anchors.device)
    if not upcast:
        return dense_lse(anchors, candidates, family, positive_index, neg_log_scale, anchors.dtype, keys)
    lse_N = dense_lse(anchors, candidates, family, positive_index, neg_log_scale, torch.float64, keys)
    return lse_N.to(torch.promote_types(anchors.dtype, torch.float32))
