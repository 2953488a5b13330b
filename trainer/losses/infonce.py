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

import kernels

KERNEL_BACKENDS = ("auto", "triton", "chunked", "reference")


def check_embeddings(anchors: Tensor, candidates: Tensor, positive_index: Optional[Tensor], *,
                     candidates_name: str = "candidates") -> Tensor:
    """Validate (N x D, M x D, positive_index) and return positive_index as a long tensor on the device."""
    if not isinstance(anchors, Tensor) or not isinstance(candidates, Tensor):
        raise ValueError(f"anchors and {candidates_name} must be torch.Tensor")
    if anchors.dim() != 2 or candidates.dim() != 2:
        raise ValueError(f"anchors and {candidates_name} must be 2-D (N x D, M x D); got "
                         f"{tuple(anchors.shape)} and {tuple(candidates.shape)}")
    if anchors.shape[1] != candidates.shape[1]:
        raise ValueError(f"embedding dim mismatch: anchors D={anchors.shape[1]}, "
                         f"{candidates_name} D={candidates.shape[1]}")
    if anchors.shape[0] == 0 or candidates.shape[0] == 0:
        raise ValueError(f"empty input: {anchors.shape[0]} anchors, {candidates.shape[0]} {candidates_name}")
    if not anchors.dtype.is_floating_point or anchors.dtype != candidates.dtype:
        raise ValueError(f"anchors and {candidates_name} must share a floating dtype; got {anchors.dtype} "
                         f"and {candidates.dtype}")
    if anchors.device != candidates.device:
        raise ValueError(f"anchors on {anchors.device} but {candidates_name} on {candidates.device}")
    num_rows, num_cols = anchors.shape[0], candidates.shape[0]
    if positive_index is None:
        if num_cols < num_rows:
            raise ValueError(f"positive_index defaults to arange(N), which needs at least N={num_rows} "
                             f"{candidates_name}; got {num_cols}")
        return torch.arange(num_rows, device=anchors.device)
    if not isinstance(positive_index, Tensor) or positive_index.dtype.is_floating_point \
            or positive_index.dtype == torch.bool:
        raise ValueError("positive_index must be an integer tensor")
    if positive_index.shape != (num_rows,):
        raise ValueError(f"positive_index must have shape (N,)=({num_rows},), got {tuple(positive_index.shape)}")
    positive_index = positive_index.to(device=anchors.device, dtype=torch.long)
    if int(positive_index.min()) < 0 or int(positive_index.max()) >= num_cols:
        raise ValueError(f"positive_index out of range [0, {num_cols})")
    return positive_index


def check_temperature(temperature: float, name: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{name} must be a number > 0, got {temperature!r}")
    return float(temperature)


def check_kernel(kernel: str) -> str:
    if kernel not in KERNEL_BACKENDS:
        raise ValueError(f"kernel must be one of {', '.join(KERNEL_BACKENDS)}, got {kernel!r}")
    return kernel


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


def infonce_loss(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                 positive_index: Optional[Tensor] = None, queue: Optional[Tensor] = None,
                 kernel: str = "auto") -> dict[str, Tensor]:
    """InfoNCE / NT-Xent as in SimCSE (Gao et al., "SimCSE: Simple Contrastive Learning of Sentence
    Embeddings", EMNLP 2021), mean over the N anchor rows::

        l_i = -s_ip / tau + log sum_j exp(s_ij / tau)        (scale = 1 / tau)

    ``s_ij = <a_i, c_j>`` for L2-normalised ``anchors`` (N x D) and ``candidates`` (M x D); ``p(i) =
    positive_index[i]`` (default ``arange(N)``). ``queue`` (K x D, optional) adds K negative columns after
    the candidates, without gradient. ``kernel`` picks the ``kernels.sim_softmax_lse`` backend.

    Returns ``{"loss": scalar with grad, "pos_sim": mean s_ip (detached)}``; float32 (float64 for float64
    inputs) whatever the input precision.
    """
    temperature = check_temperature(temperature)
    check_kernel(kernel)
    positive_index = check_embeddings(anchors, candidates, positive_index)
    columns = append_queue(candidates, queue)
    lse_N = kernels.sim_softmax_lse(anchors, columns, temperature=temperature, positive_index=positive_index,
                                    backend=kernel)
    pos_sim_N = positive_similarity(anchors, candidates, positive_index)
    loss = (lse_N.to(pos_sim_N.dtype) - pos_sim_N / temperature).mean()
    return {"loss": loss, "pos_sim": pos_sim_N.detach().mean()}
