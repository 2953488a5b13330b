"""Everything that touches `torch.distributed` lives here: rank info, gather-with-gradient, reductions.

Layout of the distributed contrastive loss (open_clip / sentence-transformers style): each rank keeps its
B_local anchors and scores them against the candidates of ALL ranks, gathered with `gather_with_grad`, so
anchor i of rank r has its positive at global column `r * B_local + i`. Each rank's loss is the MEAN over its
local rows. Why that gives exactly the single-process gradient on the concatenated batch:
the single-process loss is L = (1/W) sum_r L_r. `all_gather`'s backward sums, onto the owner, the gradients
every rank's L_r' sends to the owner's embeddings, so rank r ends with g_r = d(sum_r' L_r')/d(emb_r) *
d(emb_r)/d(theta); DDP then AVERAGES g_r over ranks: (1/W) sum_r g_r = dL/dtheta. (Summing instead of
averaging, or gathering without gradient, gives the W-times-too-large or lost gradients of pytorch#58005.)
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (same shape on all ranks) concatenated in rank order along dim 0; differentiable:
    the gradient w.r.t. each rank's slice returns to its owner (backward = reduce-scatter of the sums)."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order, without gradient (e.g. to enqueue a shared queue)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a copy; `t` is untouched)."""
    if world_size() == 1:
        return t.clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
