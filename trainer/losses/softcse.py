"""SoftCSE: InfoNCE whose negatives are not all equally negative.

After "Not All Negatives are Equally Negative: Soft Contrastive Learning for Unsupervised Sentence
Representations" (CIKM 2024). The paper's exact functions could not be read from any available source; the
two families below carry its stated mechanism (a negative that resembles the anchor is pushed less) and
contain InfoNCE as an exact limit (DESIGN.md, loss math contract). Both are computed in-kernel by
``kernels.sim_softmax_lse`` from the stop-gradient similarity ``sg(s_ij)`` clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from trainer import kernels
from trainer.kernels.family import check_number
from trainer.losses.infonce import append_queue, check_common, contrastive_terms

SOFTCSE_MODES = ("weight", "temperature")
# A row whose negatives all weigh 0 (every negative at s = 1) would get log(mean w) = -inf; flooring the
# mean keeps neg_log_scale finite, and the zero weights stay zero (log w = -inf + finite).
_MIN_MEAN_WEIGHT = 1e-30


def softcse_family_kwargs(*, temperature: float, mode: str = "weight", gamma: float = 1.0,
                          tau_min: Optional[float] = None, tau_max: Optional[float] = None,
                          normalize_weights: bool = False) -> dict:
    """Validate SoftCSE hyper-parameters (defaults: ``softcse_loss``'s); return the ``sim_softmax_lse``
    family keywords."""
    if mode not in SOFTCSE_MODES:
        raise ValueError(f"mode must be one of {', '.join(SOFTCSE_MODES)}, got {mode!r}")
    gamma = check_number(gamma, "gamma", minimum=0.0)
    if mode == "weight":
        if tau_min is not None or tau_max is not None:
            raise ValueError("tau_min/tau_max apply to mode='temperature' only")
        return {"weight_gamma": gamma}
    if normalize_weights:
        raise ValueError("normalize_weights applies to mode='weight' only")
    tau_min = temperature if tau_min is None else check_number(tau_min, "tau_min", minimum=0.0, strict=True)
    tau_max = temperature if tau_max is None else check_number(tau_max, "tau_max", minimum=0.0, strict=True)
    # gamma = 0 would make the ramp a constant tau_max (0^0 = 1): a valid but surprising family; the kernel
    # needs tau_gamma > 0, and ((1 + s)/2)^gamma -> 1 as gamma -> 0 for s > -1, so use tau_max directly.
    if gamma == 0:
        return {"tau_min": tau_max, "tau_max": tau_max, "tau_gamma": 1.0}
    return {"tau_min": tau_min, "tau_max": tau_max, "tau_gamma": gamma}


def softcse_terms(anchors: Tensor, candidates: Tensor, positive_index: Tensor, queue: Optional[Tensor], *,
                  temperature: float, kernel: str, family: dict, normalize_weights: bool,
                  exclude: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
    """Hot path of ``softcse_loss`` on checked inputs (``family`` from ``softcse_family_kwargs``)."""
    columns = append_queue(candidates, queue)
    out: dict[str, Tensor] = {}
    neg_log_scale = None
    if normalize_weights and columns.shape[0] > 1:
        mean_w_N = kernels.mean_negative_weight(anchors.detach(), columns.detach(),
                                                weight_gamma=family["weight_gamma"], positive_index=positive_index,
                                                exclude=exclude)
        neg_log_scale = -torch.log(mean_w_N.clamp_min(_MIN_MEAN_WEIGHT))
        out["mean_neg_weight"] = mean_w_N.mean()
    terms = contrastive_terms(anchors, candidates, columns, positive_index, temperature=temperature,
                              kernel=kernel, neg_log_scale=neg_log_scale, exclude=exclude, **family)
    return {**terms, **out}


def softcse_loss(anchors: Tensor, candidates: Tensor, *, mode: str = "weight", temperature: float = 0.05,
                 gamma: float = 1.0, tau_min: Optional[float] = None, tau_max: Optional[float] = None,
                 normalize_weights: bool = False, positive_index: Optional[Tensor] = None,
                 queue: Optional[Tensor] = None, kernel: str = "auto",
                 exclude: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
    """SoftCSE loss (CIKM 2024), mean over the N anchor rows; scale = 1 / tau, ``sg`` = stop-gradient.

    ``mode="weight"``: each negative's term is weighted by ``w_ij = ((1 - sg(s_ij)) / 2) ** gamma``,
    the positive by 1::

        l_i = -s_ip / tau + log( exp(s_ip / tau) + sum_{j != p} w_ij exp(s_ij / tau) )

    i.e. a log-sum-exp over ``s_ij / tau + log w_ij``. ``gamma = 0`` is exactly InfoNCE; a negative at
    ``s = 1`` (a duplicate of the anchor) weighs 0. ``normalize_weights=True`` divides the weights by their
    mean over the row's negatives (so the mean negative weight is 1, keeping the loss scale comparable).

    ``mode="temperature"``: each negative gets its own temperature, the positive keeps ``tau``::

        l_i = -s_ip / tau + log( exp(s_ip / tau) + sum_{j != p} exp(s_ij / tau_ij) )
        tau_ij = tau_min + (tau_max - tau_min) * ((1 + sg(s_ij)) / 2) ** gamma

    similar negatives get the higher (softer) temperature. ``tau_min``/``tau_max`` default to ``tau``;
    ``tau_min = tau_max = tau`` is exactly InfoNCE.

    Weights and temperatures are constants for autograd (stop-gradient): the gradient is that of the loss
    with ``w``/``tau_ij`` frozen at their current values. ``queue`` (K x D) adds negative columns without
    gradient; ``positive_index`` defaults to ``arange(N)``; ``kernel`` picks the fused-op backend.
    ``exclude=(row_keys, col_keys)`` takes columns out of rows' sums and out of the weight normalisation
    (see ``infonce_loss``).

    Returns ``{"loss", "pos_sim"}`` (+ ``"mean_neg_weight"`` when ``normalize_weights``), all but "loss"
    detached.
    """
    positive_index, temperature = check_common(anchors, candidates, positive_index, temperature=temperature,
                                               kernel=kernel)
    family = softcse_family_kwargs(mode=mode, temperature=temperature, gamma=gamma, tau_min=tau_min,
                                   tau_max=tau_max, normalize_weights=normalize_weights)
    return softcse_terms(anchors, candidates, positive_index, queue, temperature=temperature, kernel=kernel,
                         family=family, normalize_weights=normalize_weights, exclude=exclude)
