"""`PairStream`: the training stream of pair shards (trainer.data.pairs), with K hard negatives per pair.

Same epoch plan, rank/worker split, shuffle buffer, bad-shard policy and exact resume as `TrainStream` (it is
one, reading another sample layout). A batch of B pairs holds, as int64 arrays:

    input_ids, attention_mask[, token_type_ids]            B anchors
    positive_input_ids, positive_attention_mask[, ...]      B positives
    negative_input_ids, negative_attention_mask[, ...]      B*K hard negatives, row i's at [i*K, (i+1)*K)
    anchor_hash, positive_hash (B,), negative_hash (B*K,)   `text_hash` of every text (duplicate masking)

K is fixed for the run (every rank gathers the same shapes). A pair with more than K negatives uses K of them,
drawn again each epoch (seeded by seed, epoch and the sample key, so a resumed run draws the same); a pair
with fewer fills the missing slots with an empty text whose hash is `PAD_HASH`, which the pair step leaves
out of every row's loss. K = 0 reads no negatives at all (no `negative_*` keys).
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np

from trainer.data.pairs import PAD_HASH, Pair, decode_pair, text_hash
from trainer.data.shard_format import iter_tar_records
from trainer.data.stream import TrainStream
from trainer.data.tokenize import Arrays

PAIR_PREFIXES = ("positive_", "negative_")
HASH_KEYS = ("anchor_hash", "positive_hash", "negative_hash")


class PairStream(TrainStream):
    """`TrainStream` over pair shards; `hard_negatives` is K (see the module docstring). Takes the same
    arguments as `TrainStream` except `fraternal` (IFTCL's augmented view is defined on sentences)."""

    format = "pairs"

    def __init__(self, cfg: Any, tokenizer: Any, *, hard_negatives: int, **kwargs: Any):
        if kwargs.get("fraternal") is not None:
            raise ValueError("pair data has no fraternal view (IFTCL trains on sentences)")
        if hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {hard_negatives}")
        super().__init__(cfg, tokenizer, **kwargs)
        self.hard_negatives = hard_negatives

    def _tar_samples(self, stream: Any, shard: str) -> Iterator[tuple[str, Any]]:
        return iter_tar_records(stream, shard)

    def _decode(self, key: str, raw: Any, shard: str) -> Pair:
        return decode_pair(raw, key, shard)

    def _negatives(self, key: str, negatives: tuple[str, ...], epoch: int) -> list[str]:
        k = self.hard_negatives
        if len(negatives) > k:
            return random.Random(f"negatives:{self.seed}:{epoch}:{key}").sample(negatives, k)
        return [*negatives, *[""] * (k - len(negatives))]

    def _encode_chunk(self, chunk: list[tuple[str, Any]], epoch: int) -> Arrays:
        anchors = [pair[0] for _, pair in chunk]
        positives = [pair[1] for _, pair in chunk]
        batch = self._encode(anchors)
        batch.update({f"positive_{k}": v for k, v in self._encode(positives).items()})
        batch["anchor_hash"] = np.array([text_hash(t) for t in anchors], dtype=np.int64)
        batch["positive_hash"] = np.array([text_hash(t) for t in positives], dtype=np.int64)
        if self.hard_negatives:
            negatives = [n for key, pair in chunk for n in self._negatives(key, pair[2], epoch)]
            batch.update({f"negative_{k}": v for k, v in self._encode(negatives).items()})
            batch["negative_hash"] = np.array([text_hash(t) if t else PAD_HASH for t in negatives], dtype=np.int64)
        return batch

    def _layout(self) -> dict:
        return {**super()._layout(), "format": self.format, "hard_negatives": self.hard_negatives}
