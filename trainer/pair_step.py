"""One training step on pair data (supervised SimCSE style): anchors against every rank's positives and hard
negatives, with duplicate-aware negatives.

Legend: B pairs per rank, K hard negatives per pair, W ranks, D embedding dim. A pair batch
(trainer.data.pair_stream) holds B anchors, B positives, B*K hard negatives and the 64-bit hashes of all
their texts. One forward encodes [anchors; positives; negatives]; every rank's positives and negatives are
gathered with gradient (`distributed.gather_with_grad`, one collective) and laid out as

    candidates = [all ranks' positives (W*B); all ranks' hard negatives (W*B*K)] (+ the queue, in the objective)
    positive_index(i) = rank * B + i

so anchor i of rank r has its own positive at column r*B + i, and every other positive and every hard
negative of the global batch is a negative for it. Each rank's loss is the mean over its B rows; with DDP's
averaging that is the single-process loss on the concatenated batch (tests/test_pairs_distributed.py).

Duplicate-aware negatives (`loss.mask_duplicates`): a candidate whose text equals the anchor's text or its
positive's text is not a negative, whatever its column (another row's positive or hard negative, a queued
entry): it is left out of the row's sum, w_ij = 0, through the fused op's `exclude` keys (row keys: anchor
and positive hashes; column keys: the candidates' hashes, gathered like the embeddings, without gradient).
Dropout gives two copies of a text different embeddings, so only the texts can tell. The positive column
itself always stays. Empty hard-negative slots (`PAD_HASH`: pairs with fewer than K negatives) are left out
of every row, with or without masking. `masked_duplicates` counts the masked (row, column) pairs of the
whole global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer import distributed as dist
from trainer.data.pairs import PAD_HASH

_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def is_pair_batch(batch: dict) -> bool:
    """Whether `batch` comes from pair data (the engine dispatches each batch on this)."""
    return "positive_input_ids" in batch


def _stacked_views(batch: dict, prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """The token arrays of several roles as one batch, right-padded with 0 to the longest row (attention_mask 0
    there, so the pad id never matters)."""
    out = {}
    for key in _TOKEN_KEYS:
        parts = [batch[p + key] for p in prefixes if p + key in batch]
        if not parts:
            continue
        width = max(x.shape[1] for x in parts)
        out[key] = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in parts])
    return out


def count_masked(anchor_keys: Tensor, positive_keys: Tensor, col_keys: Tensor) -> Tensor:
    """Number of (row, column) pairs left out as duplicates: columns whose key is the row's anchor or positive
    key, less the row's own positive column; O((N + M) log M) by sorted search, no N x M matrix."""
    cols, _ = torch.sort(col_keys)

    def occurrences(keys: Tensor) -> Tensor:
        return torch.searchsorted(cols, keys, right=True) - torch.searchsorted(cols, keys)

    same = anchor_keys == positive_keys
    per_row = occurrences(positive_keys) + torch.where(same, 0, occurrences(anchor_keys)) - 1
    return per_row.sum()


def pair_step_loss(model, batch: dict, objective, rank: int) -> tuple[dict, Tensor, Tensor]:
    """Encode a pair batch, gather candidates and their text keys across ranks, score this rank's anchors.

    Returns the objective's loss dict (+ `masked_duplicates` when masking), the gathered candidates (detached)
    and their keys, for `objective.enqueue(candidates, keys)` once the backward is done."""
    num = batch["input_ids"].shape[0]
    has_neg = "negative_input_ids" in batch
    prefixes = ("", "positive_", "negative_") if has_neg else ("", "positive_")
    emb = model(**_stacked_views(batch, prefixes))
    anchors, local = emb[:num], emb[num:]  # local: this rank's B positives, then its B*K negatives
    world, per_rank = dist.world_size(), local.shape[0]
    gathered = dist.gather_with_grad(local).view(world, per_rank, -1)
    candidates = torch.cat([gathered[:, :num].reshape(world * num, -1),
                            gathered[:, num:].reshape(world * (per_rank - num), -1)])

    local_keys = [batch["positive_hash"], batch.get("negative_hash", batch["positive_hash"][:0]), batch["anchor_hash"]]
    # the embedding gather above already checked that every rank holds the same B and K
    keys = dist.gather_no_grad(torch.cat(local_keys), check_shapes=False).view(world, -1)
    col_keys = torch.cat([keys[:, :num].reshape(-1), keys[:, num:per_rank].reshape(-1)])

    positive_index = torch.arange(num, device=emb.device) + rank * num
    pad = torch.full_like(batch["anchor_hash"], PAD_HASH)
    exclude = None
    if objective.mask_duplicates:
        exclude = (torch.stack([batch["anchor_hash"], batch["positive_hash"], pad], dim=1), col_keys)
    elif has_neg:
        exclude = (pad[:, None], col_keys)
    out = objective(anchors, candidates, positive_index=positive_index, exclude=exclude)
    if objective.mask_duplicates:
        queued = objective.queue.keys()
        all_cols = col_keys if queued is None else torch.cat([col_keys, queued.to(col_keys.device)])
        out["masked_duplicates"] = count_masked(keys[:, per_rank:].reshape(-1), keys[:, :num].reshape(-1),
                                                all_cols).to(anchors.dtype)
    return out, candidates.detach(), col_keys
