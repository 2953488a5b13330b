"""InfoNCE (SimCSE) and the helpers every loss in this package shares.

Legend: N anchors (local rows), M candidates (columns: every rank's positives, then queue entries), D dim.
Inputs are L2-normalised embeddings, so ``s_ij = <a_i, c_j>`` is the cosine similarity. Logits are
``s / tau`` (scale = 1 / tau). The log-sum-exp over candidates always runs through the fused op
``kernels.sim_softmax_lse`` (O(N + M) memory, never an N x M matrix); only the positive term
``-s_ip / tau`` is computed here in torch, in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from trainer import kernels
from trainer.kernels.dispatch import check_backend
from trainer.kernels.family import check_number, check_tensors
from trainer.losses.guided import guided_lse
from trainer.losses.metrics import negative_softmax_mass


def check_common(anchors: Tensor, candidates: Tensor, positive_index: Optional[Tensor], *, temperature: float,
                 kernel: str, candidates_name: str = "candidates") -> tuple[Tensor, float]:
    """The checks every public loss starts with: (positive_index as a long tensor on the device, temperature).

    Python scalars and shapes only: nothing here reads a device tensor's values (no GPU->CPU sync).
    """
    temperature = check_number(temperature, "temperature", minimum=0.0, strict=True)
    check_backend(kernel, "kernel")
    positive_index, _ = check_tensors(anchors, candidates, positive_index, candidates_name=candidates_name)
    return positive_index, temperature


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for fp16/bf16/fp32 inputs, float64 for float64: the dtype of lse and of the loss."""
    return torch.promote_types(x.dtype, torch.float32)


def positive_similarity(anchors: Tensor, candidates: Tensor, positive_index: Tensor) -> Tensor:
    """s_ip = <a_i, c_p(i)> (N,), accumulated in float32 (float64 for float64 inputs); differentiable."""
    dtype = compute_dtype(anchors)
    return (anchors.to(dtype) * candidates.index_select(0, positive_index).to(dtype)).sum(dim=1)


def append_queue(candidates: Tensor, queue: Optional[Tensor]) -> Tensor:
    """Columns [candidates; queue]: the queue entries are extra negatives without gradient."""
    if queue is None:
        return candidates
    if hasattr(queue, "negatives"):  # a HippocampusQueue
        queue = queue.negatives()
        if queue is None:
            return candidates
    if not isinstance(queue, Tensor) or queue.dim() != 2 or queue.shape[1] != candidates.shape[1]:
        raise ValueError(f"queue must be a (K, D={candidates.shape[1]}) tensor, got "
                         f"{getattr(queue, 'shape', type(queue).__name__)}")
    if queue.shape[0] == 0:
        return candidates
    return torch.cat([candidates, queue.detach().to(device=candidates.device, dtype=candidates.dtype)])


def contrastive_terms(anchors: Tensor, candidates: Tensor, columns: Tensor, positive_index: Tensor, *,
                      temperature: float, kernel: str, exclude: Optional[tuple[Tensor, Tensor]] = None,
                      guide: Optional[tuple[Tensor, Tensor]] = None, **family) -> dict[str, Tensor]:
    """Hot path shared by InfoNCE and SoftCSE, on inputs the public function checked: mean_i of
    ``lse_i - s_ip / tau`` with lse over ``columns`` (candidates + queue) and the ``family`` keywords (read
    from the ``guide`` embeddings' similarity when given: ``trainer/losses/guided.py``), leaving out the
    ``exclude`` keys' columns (duplicate-aware negatives of pair data)."""
    if guide is None:
        lse_N = kernels.sim_softmax_lse(anchors, columns, temperature=temperature, positive_index=positive_index,
                                        backend=kernel, exclude=exclude, **family)
    elif exclude is not None:
        raise ValueError("a guide (weights from a frozen encoder) and exclude keys cannot be combined yet")
    else:
        lse_N = guided_lse(anchors, columns, *guide, temperature=temperature, positive_index=positive_index,
                           **family)
    pos_sim_N = positive_similarity(anchors, candidates, positive_index)
    loss_N = lse_N.to(pos_sim_N.dtype) - pos_sim_N / temperature
    return {"loss": loss_N.mean(), "pos_sim": pos_sim_N.detach().mean(),
            "neg_softmax_mass": negative_softmax_mass(loss_N)}


def infonce_loss(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                 positive_index: Optional[Tensor] = None, queue: Optional[Tensor] = None,
                 kernel: str = "auto", exclude: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
    """InfoNCE / NT-Xent as in SimCSE (Gao et al., "SimCSE: Simple Contrastive Learning of Sentence
    Embeddings", EMNLP 2021), mean over the N anchor rows::

        l_i = -s_ip / tau + log sum_j exp(s_ij / tau)        (scale = 1 / tau)

    ``s_ij = <a_i, c_j>`` for L2-normalised ``anchors`` (N x D) and ``candidates`` (M x D); ``p(i) =
    positive_index[i]`` (default ``arange(N)``). ``queue`` (K x D, optional) adds K negative columns after
    the candidates, without gradient. ``kernel`` picks the ``kernels.sim_softmax_lse`` backend.
    ``exclude=(row_keys, col_keys)`` leaves columns out of rows' sums by key (``kernels.sim_softmax_lse``;
    ``col_keys`` covers the candidates, then the queue): the trainer's duplicate-aware negatives.

    Returns ``{"loss": scalar with grad, "pos_sim": mean s_ip, "neg_softmax_mass"}`` (detached; the mass is
    defined in ``trainer/losses/metrics.py``); float32 (float64 for float64 inputs) whatever the input
    precision.
    """
    positive_index, temperature = check_common(anchors, candidates, positive_index, temperature=temperature,
                                               kernel=kernel)
    return contrastive_terms(anchors, candidates, append_queue(candidates, queue), positive_index,
                             temperature=temperature, kernel=kernel, exclude=exclude)
