"""SoftCSE: InfoNCE whose negatives are not all equally negative.

After "Not All Negatives are Equally Negative: Soft Contrastive Learning for Unsupervised Sentence
Representations" (CIKM 2024). The paper's exact functions could not be read from any available source; the
two families below carry its stated mechanism (a negative that resembles the anchor is pushed less) and
contain InfoNCE as an exact limit (DESIGN.md, loss math contract). Both are computed in-kernel by
``kernels.sim_softmax_lse`` from the stop-gradient similarity ``sg(s_ij)`` clamped to [-1, 1].

The papers' stated mechanism: negatives are not equally negative, so each gets its own weight or temperature
from its similarity to the anchor, the positive keeps weight 1 and the base temperature. Our choices (each
switchable, defaults first): the families ``((1 - s)/2)^gamma`` and the ``tau_min..tau_max`` ramp; the ramp's
direction (``tau_direction``: ``soft_hard`` gives similar negatives the high, soft temperature, ``hard_soft``
the low one); the similarity the family reads (``guide``: the model's own ``sg(s_ij)``, or a frozen copy of the
initial encoder's, the teacher-guided variant of later work, ``trainer/losses/guided.py``); stop-gradient
through the family; optional renormalisation of the weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from trainer import kernels
from trainer.kernels.family import check_number
from trainer.losses.infonce import append_queue, check_common, contrastive_terms

SOFTCSE_MODES = ("weight", "temperature")
TAU_DIRECTIONS = ("soft_hard", "hard_soft")
# A row whose negatives all weigh 0 (every negative at s = 1) would get log(mean w) = -inf; flooring the
# mean keeps neg_log_scale finite, and the zero weights stay zero (log w = -inf + finite).
_MIN_MEAN_WEIGHT = 1e-30


def softcse_family_kwargs(*, temperature: float, mode: str = "weight", gamma: float = 1.0,
                          tau_min: Optional[float] = None, tau_max: Optional[float] = None,
                          normalize_weights: bool = False, tau_direction: str = "soft_hard") -> dict:
    """Validate SoftCSE hyper-parameters (defaults: ``softcse_loss``'s); return the ``sim_softmax_lse``
    family keywords."""
    if mode not in SOFTCSE_MODES:
        raise ValueError(f"mode must be one of {', '.join(SOFTCSE_MODES)}, got {mode!r}")
    if tau_direction not in TAU_DIRECTIONS:
        raise ValueError(f"tau_direction must be one of {', '.join(TAU_DIRECTIONS)}, got {tau_direction!r}")
    gamma = check_number(gamma, "gamma", minimum=0.0)
    if mode == "weight":
        if tau_min is not None or tau_max is not None or tau_direction != "soft_hard":
            raise ValueError("tau_min/tau_max/tau_direction apply to mode='temperature' only")
        return {"weight_gamma": gamma}
    if normalize_weights:
        raise ValueError("normalize_weights applies to mode='weight' only")
    tau_min = temperature if tau_min is None else check_number(tau_min, "tau_min", minimum=0.0, strict=True)
    tau_max = temperature if tau_max is None else check_number(tau_max, "tau_max", minimum=0.0, strict=True)
    # The op's ramp runs from its tau_min at s = -1 to its tau_max at s = 1 (either may be the larger):
    # hard_soft hands it the two ends swapped, so the most similar negatives get the low temperature.
    start, end = (tau_min, tau_max) if tau_direction == "soft_hard" else (tau_max, tau_min)
    # gamma = 0 would make the ramp a constant `end` (0^0 = 1): a valid but surprising family; the kernel
    # needs tau_gamma > 0, and ((1 + s)/2)^gamma -> 1 as gamma -> 0 for s > -1, so use `end` directly.
    if gamma == 0:
        return {"tau_min": end, "tau_max": end, "tau_gamma": 1.0}
    return {"tau_min": start, "tau_max": end, "tau_gamma": gamma}


def softcse_terms(anchors: Tensor, candidates: Tensor, positive_index: Tensor, queue: Optional[Tensor], *,
                  temperature: float, kernel: str, family: dict, normalize_weights: bool,
                  exclude: Optional[tuple[Tensor, Tensor]] = None,
                  guide: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
    """Hot path of ``softcse_loss`` on checked inputs (``family`` from ``softcse_family_kwargs``)."""
    columns = append_queue(candidates, queue)
    out: dict[str, Tensor] = {}
    neg_log_scale = None
    if normalize_weights and columns.shape[0] > 1:
        # the weights' own similarity: the guide's when there is one
        rows, cols = (anchors, columns) if guide is None else guide
        mean_w_N = kernels.mean_negative_weight(rows.detach(), cols.detach(),
                                                weight_gamma=family["weight_gamma"], positive_index=positive_index,
                                                exclude=exclude)
        neg_log_scale = -torch.log(mean_w_N.clamp_min(_MIN_MEAN_WEIGHT))
        out["mean_neg_weight"] = mean_w_N.mean()
    terms = contrastive_terms(anchors, candidates, columns, positive_index, temperature=temperature,
                              kernel=kernel, neg_log_scale=neg_log_scale, exclude=exclude, guide=guide, **family)
    return {**terms, **out}


def check_guide(guide, anchors: Tensor, candidates: Tensor, queue) -> Optional[tuple[Tensor, Tensor]]:
    """``guide`` = (guide anchors N x D', guide candidates M x D'), detached, in the anchors' device and
    compute dtype; None passes through."""
    if guide is None:
        return None
    if not isinstance(guide, (tuple, list)) or len(guide) != 2 or not all(isinstance(g, Tensor) for g in guide):
        raise ValueError("guide must be a pair of tensors (guide_anchors, guide_candidates)")
    if append_queue(candidates, queue) is not candidates:
        raise ValueError("guide (weights from a frozen encoder) needs the frozen embeddings of every column; "
                         "it does not support a queue")
    g_a, g_c = guide
    if g_a.dim() != 2 or g_c.dim() != 2 or g_a.shape[1] != g_c.shape[1] or g_a.shape[0] != anchors.shape[0] \
            or g_c.shape[0] != candidates.shape[0]:
        raise ValueError(f"guide shapes must be (N={anchors.shape[0]}, D') and (M={candidates.shape[0]}, D'), "
                         f"got {tuple(g_a.shape)} and {tuple(g_c.shape)}")
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    return tuple(g.detach().to(device=anchors.device, dtype=dtype) for g in guide)


def softcse_loss(anchors: Tensor, candidates: Tensor, *, mode: str = "weight", temperature: float = 0.05,
                 gamma: float = 1.0, tau_min: Optional[float] = None, tau_max: Optional[float] = None,
                 normalize_weights: bool = False, positive_index: Optional[Tensor] = None,
                 queue: Optional[Tensor] = None, kernel: str = "auto", tau_direction: str = "soft_hard",
                 exclude: Optional[tuple[Tensor, Tensor]] = None,
                 guide: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
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

    similar negatives get the higher (softer) temperature (``tau_direction="soft_hard"``, the default);
    ``tau_direction="hard_soft"`` runs the ramp the other way, ``tau_ij = tau_max + (tau_min - tau_max) *
    ((1 + sg(s_ij)) / 2) ** gamma``, so similar negatives get the lower (harder) temperature. ``tau_min``/
    ``tau_max`` default to ``tau``; ``tau_min = tau_max = tau`` is exactly InfoNCE in either direction.

    ``guide=(g_a, g_c)`` (N x D', M x D'; e.g. a frozen copy of the initial encoder's embeddings of the same
    rows and columns) makes ``w_ij``/``tau_ij`` functions of ``sg(<g_a_i, g_c_j>)`` instead of ``sg(s_ij)``;
    the guide equal to the inputs themselves gives exactly the unguided loss. It runs through the chunked
    torch path of ``trainer/losses/guided.py`` (memory O(N x B), never N x M), not the Triton kernel, and
    takes no queue (queued columns have no frozen embedding).

    Weights and temperatures are constants for autograd (stop-gradient): the gradient is that of the loss
    with ``w``/``tau_ij`` frozen at their current values. ``queue`` (K x D) adds negative columns without
    gradient; ``positive_index`` defaults to ``arange(N)``; ``kernel`` picks the fused-op backend.
    ``exclude=(row_keys, col_keys)`` takes columns out of rows' sums and out of the weight normalisation
    (see ``infonce_loss``).

    Returns ``{"loss", "pos_sim", "neg_softmax_mass"}`` (+ ``"mean_neg_weight"`` when ``normalize_weights``),
    all but "loss" detached (``neg_softmax_mass``: ``trainer/losses/metrics.py``).
    """
    positive_index, temperature = check_common(anchors, candidates, positive_index, temperature=temperature,
                                               kernel=kernel)
    family = softcse_family_kwargs(mode=mode, temperature=temperature, gamma=gamma, tau_min=tau_min,
                                   tau_max=tau_max, normalize_weights=normalize_weights,
                                   tau_direction=tau_direction)
    guide = check_guide(guide, anchors, candidates, queue)
    return softcse_terms(anchors, candidates, positive_index, queue, temperature=temperature, kernel=kernel,
                         family=family, normalize_weights=normalize_weights, exclude=exclude, guide=guide)
