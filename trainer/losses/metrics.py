"""Mechanism metrics: what each loss does to the rows it trains on, logged as ``train/<name>``.

Legend: N local anchor rows, M columns (candidates, then queue entries), B a block of columns. Every value is a
detached 0-dim tensor (the mean over the N local rows) computed on the device with no host sync; the engine
reads it with ``float()`` only on log steps. Per row i, with ``p(i)`` its positive column:

- ``pos_sim``: ``s_ip``, the similarity to the positive (IFTCL: to the identical twin).
- ``neg_softmax_mass``: ``1 - P_ip``, the probability the loss's own softmax (with its weights and
  temperatures) puts on the negatives; ``P_ip = exp(s_ip/tau - lse_i) = exp(-l_i)``, so it is computed from the
  per-row loss ``l_i`` the step already has. The positive's gradient is ``-(1 - P_ip)/tau``: the mass is the
  fraction of the full pull the positive still gets (0: the row is solved and contributes no gradient).
  IFTCL: the identical-twin term's, comparable with InfoNCE's.
- ``hardest_neg_sim``: ``max_{j != p(i)} s_ij`` over every negative column (queue included; pair data's
  duplicate columns, the loss's ``exclude`` keys, left out as the loss leaves them out). The only metric
  that needs the N x M similarities: a chunked max under no_grad on the detached embeddings (memory
  O(N x B)), computed only when the objective is told the step is logged (``log_mechanisms``).
- SoftCSE: ``hardest_neg_weight`` (weight mode) or ``hardest_neg_tau`` (temperature mode), the family's value at
  that hardest negative (read from the frozen encoder's similarity of the same pair with
  ``weight_source=frozen``).
- IFTCL: ``margin_mean`` (``d_i = s(a_i, I_i) - s(a_i, F_i)``), ``hinge_active_frac`` (rows of the Twins term
  whose ``d_i`` lies outside the band, i.e. with a non-zero hinge), ``fraternal_unchanged_frac`` (rows whose
  fraternal view has the same tokens as the anchor: a second identical twin).
- ``queue_fill``: queue entries / queue size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from trainer.kernels.chunked import default_block_size
from trainer.kernels.family import (check_exclude, check_family, excluded_mask, negative_inv_tau, negative_log_weight,
                                    positive_mask)


def negative_softmax_mass(loss_N: Tensor) -> Tensor:
    """mean_i 1 - exp(-l_i) from the per-row losses (detached); expm1 keeps small masses exact."""
    return torch.expm1(-loss_N.detach()).neg_().mean()


@torch.no_grad()
def hardest_negatives(anchors: Tensor, columns: Tensor, positive_index: Tensor,
                      block_size: Optional[int] = None,
                      exclude: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """(max similarity over each row's negative columns (N,), its column (N,)); -inf where a row has none.
    ``exclude=(row_keys, col_keys)``: the loss's duplicate keys; those columns are no negatives."""
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    a_ND = anchors.detach().to(dtype)
    keys = check_exclude(exclude, a_ND.shape[0], columns.shape[0], a_ND.device)
    block = block_size or default_block_size(a_ND.shape[0], columns.shape[0])
    best_N = torch.full((a_ND.shape[0],), float("-inf"), dtype=dtype, device=a_ND.device)
    index_N = torch.zeros(a_ND.shape[0], dtype=torch.long, device=a_ND.device)
    for start in range(0, columns.shape[0], block):
        sim_NB = a_ND @ columns[start:start + block].detach().to(dtype).T
        drop_NB = positive_mask(positive_index, start, sim_NB.shape[1])
        if keys is not None:
            drop_NB |= excluded_mask(keys, start, sim_NB.shape[1])
        sim_NB.masked_fill_(drop_NB, float("-inf"))
        value_N, arg_N = sim_NB.max(dim=1)
        better_N = value_N > best_N
        best_N = torch.where(better_N, value_N, best_N)
        index_N = torch.where(better_N, arg_N + start, index_N)
    return best_N, index_N


def family_value(sim_N: Tensor, family: dict, temperature: float) -> tuple[str, Tensor]:
    """("hardest_neg_weight", w) or ("hardest_neg_tau", tau) of the ``sim_softmax_lse`` family keywords at
    the similarities ``sim_N`` (rows with no negative, sim = -inf, are left out of the mean)."""
    checked = check_family(temperature=temperature, **family)
    valid_N = torch.isfinite(sim_N)
    sg_N = sim_N.clamp(-1.0, 1.0)
    if checked.tau_min is not None:
        name, value_N = "hardest_neg_tau", negative_inv_tau(sg_N, checked).reciprocal_()
    else:
        name, value_N = "hardest_neg_weight", negative_log_weight(sg_N.clone(), checked.weight_gamma).exp_()
    return name, (value_N * valid_N).sum() / valid_N.sum().clamp_min(1)


def hardest_negative_logs(anchors: Tensor, columns: Tensor, positive_index: Tensor, *,
                          softcse_family: Optional[dict] = None, temperature: float = 0.05,
                          guide: Optional[tuple[Tensor, Tensor]] = None,
                          exclude: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
    """``hardest_neg_sim`` and, given the SoftCSE family keywords, its weight or temperature (from the
    ``guide`` similarity of the same pair when the weights come from a frozen encoder)."""
    sim_N, index_N = hardest_negatives(anchors, columns, positive_index, exclude=exclude)
    valid_N = torch.isfinite(sim_N)
    count = valid_N.sum().clamp_min(1)
    logs = {"hardest_neg_sim": torch.where(valid_N, sim_N, 0.0).sum() / count}
    if softcse_family is not None:
        source_N = sim_N
        if guide is not None:
            with torch.no_grad():
                g_a, g_c = guide
                t_N = (g_a * g_c.index_select(0, index_N)).sum(dim=1).to(sim_N.dtype)
            source_N = torch.where(valid_N, t_N, sim_N)
        name, value = family_value(source_N, softcse_family, temperature)
        logs[name] = value
    return logs


def twins_logs(margin_N: Tensor, hinge_N: Tensor, rows_N: Optional[Tensor]) -> dict[str, Tensor]:
    """IFTCL: ``margin_mean`` over all rows, ``hinge_active_frac`` over the rows of the Twins term."""
    active_N = (hinge_N.detach() > 0).to(margin_N.dtype)
    if rows_N is None:
        active = active_N.mean()
    else:
        rows = rows_N.to(margin_N.dtype)
        active = (active_N * rows).sum() / rows.sum().clamp_min(1)
    return {"margin_mean": margin_N.detach().mean(), "hinge_active_frac": active}
