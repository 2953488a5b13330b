"""IFTCL: contrastive learning with identical and fraternal twins.

After "Identical and Fraternal Twins: Fine-Grained Semantic Contrastive Learning of Sentence
Representations" (2023). Each anchor has two positives: its identical twin (same text, another dropout
mask) and its fraternal twin (a token-level augmentation, ``trainer/data/augment.py``). The paper's exact
functions could not be read from any available source; the form below carries its stated mechanisms (two
positives, a Twins loss that keeps the fraternal twin a little farther than the identical one instead of
pulling it all the way in, a hippocampus queue of past embeddings as extra negatives) and reduces to an
InfoNCE form when the Twins weight is 0 and there is no queue (DESIGN.md, loss math contract).

The paper's stated mechanism: two positives (identical and fraternal twin), the Twins loss "preserves the
margin instead of maximising the similarity" of the fraternal twin, the hippocampus queue. Our choices, each
switchable (defaults = the original form): the two-sided hinge and its band (``margin_low..margin_high``
fixed, or ``reference_margin``: centred on each pair's margin under the frozen initial encoder, its "innate"
margin); the weight of the contrastive term whose positive is the fraternal twin (``fraternal_weight``; 0
keeps that twin in the Twins term only); gradient through both similarities of the margin, or none through
the identical twin's (``stop_grad_identical``: the hinge can then no longer push the identical twin away);
rows whose fraternal view equals the anchor (a second identical twin) in or out of the Twins term
(``twins_mask``); the queue policy (FIFO of gathered identical twins).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from trainer.kernels.family import check_number, check_tensors
from trainer.losses.infonce import append_queue, check_common, contrastive_terms, positive_similarity
from trainer.losses.metrics import twins_logs
from trainer.losses.queue import HippocampusQueue
from trainer.losses.softcse import softcse_family_kwargs, softcse_terms

CONTRASTIVE_TERMS = ("infonce", "softcse")


def twins_hinge(margin_N: Tensor, margin_low: Union[float, Tensor], margin_high: Union[float, Tensor]) -> Tensor:
    """Two-sided hinge ``relu(m_low - d) + relu(d - m_high)``: zero inside [m_low, m_high], linear outside
    (bounds: floats, or per-row (N,) tensors)."""
    return torch.relu(margin_low - margin_N) + torch.relu(margin_N - margin_high)


def twins_band(margin_low: float, margin_high: float, reference_margin: Optional[Tensor]):
    """The hinge's bounds: fixed, or the band of the same width centred on each row's reference margin."""
    if reference_margin is None:
        return margin_low, margin_high
    half = 0.5 * (margin_high - margin_low)
    reference_N = reference_margin.detach()
    return reference_N - half, reference_N + half


def _check_twins_options(anchors: Tensor, fraternal_weight, reference_margin, twins_mask) -> float:
    fraternal_weight = check_number(fraternal_weight, "fraternal_weight", minimum=0.0)
    for name, value in (("reference_margin", reference_margin), ("twins_mask", twins_mask)):
        if value is not None and (not isinstance(value, Tensor) or value.shape != anchors.shape[:1]):
            raise ValueError(f"{name} must be a tensor of shape (N,)=({anchors.shape[0]},), got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
    if twins_mask is not None and twins_mask.dtype != torch.bool:
        raise ValueError(f"twins_mask must be a bool tensor, got {twins_mask.dtype}")
    return fraternal_weight


def iftcl_loss(anchors: Tensor, identical: Tensor, fraternal: Tensor, *,
               queue: Optional[Union[Tensor, HippocampusQueue]] = None, temperature: float = 0.05,
               margin_low: float = 0.0, margin_high: float = 0.2, twins_weight: float = 0.1,
               contrastive: str = "infonce", positive_index: Optional[Tensor] = None, kernel: str = "auto",
               fraternal_weight: float = 1.0, reference_margin: Optional[Tensor] = None,
               stop_grad_identical: bool = False, twins_mask: Optional[Tensor] = None,
               **softcse_kwargs) -> dict[str, Tensor]:
    """IFTCL loss (2023), mean over the N anchor rows; scale = 1 / tau, ``sg`` = stop-gradient::

        loss       = contrastive + lambda * twins
        contrastive = (L(a, [I; Q], p) + w_F * L(a, [F; Q], p)) / (1 + w_F)
        twins      = mean_i  relu(lo_i - d_i) + relu(d_i - hi_i),   d_i = s(a_i, I_p(i)) - s(a_i, F_p(i))

    ``anchors`` (N x D), ``identical`` I and ``fraternal`` F (M x D each, row p(i) = ``positive_index[i]``
    is anchor i's twin; default ``arange(N)``), ``queue`` Q (K x D, or a ``HippocampusQueue``) of past
    candidates, without gradient. ``L`` is InfoNCE ``-s_ip/tau + log sum_j exp(s_ij/tau)``
    (``contrastive="infonce"``) or SoftCSE (``contrastive="softcse"``, configured by ``softcse_kwargs``:
    ``mode``, ``gamma``, ``tau_min``, ``tau_max``, ``normalize_weights``).

    Form of the two-positive contrastive term: the mean of two single-positive terms, each scoring the anchor
    against ITS OWN twin set plus the queue. The other kind of twin is never a negative (the fraternal twin
    of sentence i must not be pushed away from anchor i in the identical term, and vice versa), every term
    keeps the standard single-positive InfoNCE/SoftCSE form (one positive column per row, which the fused
    kernel computes), and ``w_F = fraternal_weight`` (default 1: equal weights). With ``twins_weight = 0``
    and no queue the loss is exactly ``(InfoNCE(a, I) + InfoNCE(a, F)) / 2``; with ``w_F = 0`` too (the
    fraternal twin in the Twins term only), exactly ``InfoNCE(a, I)``.

    The Twins term constrains the margin ``d_i`` (gradient flows through both similarities; with
    ``stop_grad_identical`` through ``s(a_i, F_p(i))`` only: ``d_i = sg(s(a_i, I_p(i))) - s(a_i, F_p(i))``,
    same value) to ``[lo_i, hi_i] = [margin_low, margin_high]``: the fraternal twin may sit up to
    ``margin_high`` farther than the identical twin but no closer than ``margin_low`` below it. With
    ``reference_margin`` (N,) = ``r_i`` the band keeps its width and is centred on each row's reference:
    ``[r_i - (m_high - m_low)/2, r_i + (m_high - m_low)/2]`` (``r_i = (m_low + m_high)/2`` gives the fixed
    band exactly). ``twins_mask`` (N,) bool keeps only the True rows in the Twins mean (an all-True mask gives
    the plain mean). Weight ``lambda = twins_weight``.

    Returns ``{"loss", "contrastive", "twins", "identical_sim", "fraternal_sim", "margin", "margin_mean",
    "hinge_active_frac", "neg_softmax_mass"}`` (metrics: ``trainer/losses/metrics.py``); only "loss" carries
    gradient.
    """
    positive_index, temperature = check_common(anchors, identical, positive_index, temperature=temperature,
                                               kernel=kernel, candidates_name="identical")
    margin_low, margin_high = check_number(margin_low, "margin_low"), check_number(margin_high, "margin_high")
    if margin_low > margin_high:
        raise ValueError(f"margin_low must be <= margin_high, got {margin_low} > {margin_high}")
    twins_weight = check_number(twins_weight, "twins_weight", minimum=0.0)
    fraternal_weight = _check_twins_options(anchors, fraternal_weight, reference_margin, twins_mask)
    if contrastive not in CONTRASTIVE_TERMS:
        raise ValueError(f"contrastive must be one of {', '.join(CONTRASTIVE_TERMS)}, got {contrastive!r}")
    if contrastive == "infonce" and softcse_kwargs:
        raise ValueError(f"SoftCSE options {sorted(softcse_kwargs)} need contrastive='softcse'")
    family = softcse_family_kwargs(temperature=temperature, **softcse_kwargs) if contrastive == "softcse" else {}
    if not isinstance(fraternal, torch.Tensor) or fraternal.shape[:1] != identical.shape[:1]:
        raise ValueError(f"identical and fraternal must have the same rows, got {identical.shape[0]} and "
                         f"{getattr(fraternal, 'shape', [type(fraternal).__name__])[0]}")
    check_tensors(anchors, fraternal, positive_index, candidates_name="fraternal")
    negatives = queue.negatives() if isinstance(queue, HippocampusQueue) else queue

    def term(twins: Tensor) -> dict[str, Tensor]:
        # the checked hot paths, not the public losses: every check above runs once per call
        common = dict(temperature=temperature, kernel=kernel)
        if contrastive == "softcse":
            return softcse_terms(anchors, twins, positive_index, negatives, family=family,
                                 normalize_weights=softcse_kwargs.get("normalize_weights", False), **common)
        return contrastive_terms(anchors, twins, append_queue(twins, negatives), positive_index, **common)

    identical_term = term(identical)
    if fraternal_weight == 0:  # the fraternal contrastive term is not computed at all
        contrastive_loss = identical_term["loss"]
    elif fraternal_weight == 1:  # the original form, bit for bit
        contrastive_loss = 0.5 * (identical_term["loss"] + term(fraternal)["loss"])
    else:
        contrastive_loss = (identical_term["loss"] + fraternal_weight * term(fraternal)["loss"]) \
            / (1.0 + fraternal_weight)
    twins, logs = _twins_term(anchors, identical, fraternal, positive_index,
                              bounds=twins_band(margin_low, margin_high, reference_margin),
                              stop_grad_identical=stop_grad_identical, twins_mask=twins_mask)
    return {"loss": contrastive_loss + twins_weight * twins, "contrastive": contrastive_loss.detach(),
            "twins": twins.detach(), "neg_softmax_mass": identical_term["neg_softmax_mass"], **logs}


def _twins_term(anchors: Tensor, identical: Tensor, fraternal: Tensor, positive_index: Tensor, *, bounds,
                stop_grad_identical: bool, twins_mask: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """(the Twins hinge mean, its detached logs) on checked inputs; ``bounds`` from ``twins_band``."""
    identical_sim_N = positive_similarity(anchors, identical, positive_index)
    fraternal_sim_N = positive_similarity(anchors, fraternal, positive_index)
    margin_N = (identical_sim_N.detach() if stop_grad_identical else identical_sim_N) - fraternal_sim_N
    hinge_N = twins_hinge(margin_N, *bounds)
    if twins_mask is None:
        twins = hinge_N.mean()
    else:  # a masked mean without reading the count on the host
        rows_N = twins_mask.to(hinge_N.dtype)
        twins = (hinge_N * rows_N).sum() / rows_N.sum().clamp_min(1.0)
    return twins, {
        "identical_sim": identical_sim_N.detach().mean(),
        "fraternal_sim": fraternal_sim_N.detach().mean(),
        "margin": margin_N.detach().mean(),
        **twins_logs(margin_N, hinge_N, twins_mask),
    }
