"""Pair data: (anchor, positive, hard negatives) samples, their jsonl input, tar layout and text hashes.

jsonl input, one pair a line (field names configurable; `negatives` optional)::

    {"anchor": "A man plays a guitar.", "positive": "Someone plays music.", "negatives": ["A man sleeps."]}

In a shard, a pair is one webdataset sample of three members sharing its key: `<key>.anchor.txt` and
`<key>.positive.txt` (UTF-8) and `<key>.negatives.json` (a JSON list of strings, `[]` when there are none),
so `webdataset.WebDataset(url).decode()` gives `{"anchor.txt": str, "positive.txt": str, "negatives.json":
list}`. The manifest is the text shards' one with `"format": "pairs"` and negative counts.

Cleaning (`PairCleaner`, same skip reasons as sentences): a line is skipped when it is not a JSON object with
string anchor and positive (`bad_json`), when either is empty / too short / too long after stripping, or when
its (anchor, positive) repeats an earlier pair (`duplicate`, with `dedup`). Negatives that are empty, too
long, not strings, or equal to the pair's anchor or positive are dropped from the pair (counted as
`negatives_dropped`); the pair stays.

Text hashes (`text_hash`) identify texts in a batch for duplicate-aware negatives: 64-bit BLAKE2b of the
UTF-8 text as a signed int64, never `PAD_HASH` (an empty negative slot) nor the queue's unknown key (-1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from trainer.data.shard_format import ShardError, sample_key, tar_archive

PAIRS_FORMAT = "pairs"
ANCHOR, POSITIVE, NEGATIVES = "anchor.txt", "positive.txt", "negatives.json"
PAD_HASH = 0
"""Hash of an empty hard-negative slot (a pair with fewer than K negatives): every row leaves it out."""
_RESERVED = (PAD_HASH, -1)  # -1: trainer.losses.queue.UNKNOWN_KEY

Pair = tuple[str, str, tuple[str, ...]]
"""(anchor, positive, hard negatives)."""


@dataclass(frozen=True)
class PairFields:
    """JSON field names of a pair line."""

    anchor: str = "anchor"
    positive: str = "positive"
    negatives: str = "negatives"


def text_hash(text: str) -> int:
    """64-bit hash of `text` as a signed int64 (stable across processes and runs, unlike `hash()`)."""
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
    return value if value not in _RESERVED else 1  # 2 of 2^64 values moved: collisions stay ~2^-64


def pair_tar_bytes(first_index: int, pairs: Iterable[Pair]) -> bytes:
    """A shard of pairs, keys numbered from `first_index` (`sample_key`)."""

    def members():
        for i, (anchor, positive, negatives) in enumerate(pairs):
            key = sample_key(first_index + i)
            yield f"{key}.{ANCHOR}", anchor.encode("utf-8")
            yield f"{key}.{POSITIVE}", positive.encode("utf-8")
            yield f"{key}.{NEGATIVES}", json.dumps(list(negatives), ensure_ascii=False).encode("utf-8")

    return tar_archive(members())


def decode_pair(record: dict[str, bytes], key: str, shard: str) -> Pair:
    """The pair of one tar sample (`iter_tar_records`); ShardError when it is not one."""
    try:
        anchor = record[ANCHOR].decode("utf-8", "replace").strip()
        positive = record[POSITIVE].decode("utf-8", "replace").strip()
        negatives = json.loads(record[NEGATIVES]) if NEGATIVES in record else []
        if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
            raise ValueError("negatives.json is not a list of strings")
    except (KeyError, ValueError) as exc:
        raise ShardError(shard, f"sample {key} is not a pair ({exc}); text shards need data.format=text") from None
    return anchor, positive, tuple(negatives)


def is_pairs_manifest(manifest: dict) -> bool:
    return manifest.get("format") == PAIRS_FORMAT


def sniff_pairs(path: str | Path, fields: PairFields = PairFields()) -> bool:
    """True when the first non-empty line of a jsonl file (plain or .gz) is an object with string `anchor`
    and `positive` fields (how `data.format: auto` tells a pair corpus from a sentence corpus)."""
    import gzip

    name = str(path).lower()
    if not name.removesuffix(".gz").endswith((".jsonl", ".ndjson", ".json")):
        return False
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:  # type: ignore[operator]
            for line in fh:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and all(isinstance(obj.get(f), str)
                                                         for f in (fields.anchor, fields.positive))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return False


class PairCleaner:
    """Raw jsonl lines -> kept pairs, counting every skip by reason (the interface of build's `_Cleaner`)."""

    def __init__(self, *, fields: PairFields, dedup: bool, min_chars: int, max_chars: int,
                 skip_reasons: Iterable[str]):
        self.fields, self.dedup = fields, dedup
        self.min_chars, self.max_chars = min_chars, max_chars
        self.skipped = dict.fromkeys(skip_reasons, 0)
        self.seen: set[bytes] = set()
        self.lines = 0
        self.first: dict[str, str] = {}  # where the first skip of each reason was (not tracked for pairs yet)
        self.negatives = 0  # kept
        self.negatives_dropped = 0
        self.max_negatives = 0
        self.with_negatives = 0  # pairs with at least one

    def _text_skip(self, text: str) -> Optional[str]:
        n = len(text)
        return "empty" if n == 0 else "too_short" if n < self.min_chars else "too_long" if n > self.max_chars else None

    def _negatives(self, raw, anchor: str, positive: str) -> tuple[str, ...]:
        if not isinstance(raw, list):
            raw = [] if raw is None else [raw]
        kept = []
        for neg in raw:
            neg = neg.strip() if isinstance(neg, str) else None
            if neg is None or not neg or len(neg) > self.max_chars or neg in (anchor, positive):
                self.negatives_dropped += 1
            else:
                kept.append(neg)
        return tuple(kept)

    def _pair(self, line: Optional[str]) -> tuple[Optional[Pair], Optional[str]]:
        if line is None:
            return None, "invalid_utf8"
        if not line.strip():
            return None, "empty"
        try:
            obj = json.loads(line)
        except ValueError:
            return None, "bad_json"
        if not isinstance(obj, dict):
            return None, "bad_json"
        anchor, positive = obj.get(self.fields.anchor), obj.get(self.fields.positive)
        if not isinstance(anchor, str) or not isinstance(positive, str):
            return None, "bad_json"
        anchor, positive = anchor.strip(), positive.strip()
        reason = self._text_skip(anchor) or self._text_skip(positive)
        if reason:
            return None, reason
        if self.dedup:
            # 128-bit digest of the pair, as the sentence cleaner keeps: ~50 bytes a pair, deterministic
            digest = hashlib.blake2b(f"{anchor}\0{positive}".encode("utf-8"), digest_size=16).digest()
            if digest in self.seen:
                return None, "duplicate"
            self.seen.add(digest)
        return (anchor, positive, self._negatives(obj.get(self.fields.negatives), anchor, positive)), None

    def clean(self, lines: list[bytes]) -> list[Pair]:
        self.lines += len(lines)
        kept: list[Pair] = []
        for raw in lines:
            try:
                line: Optional[str] = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = None
            pair, reason = self._pair(line)
            if pair is None:
                self.skipped[reason] += 1  # type: ignore[index]
                continue
            num = len(pair[2])
            self.negatives += num
            self.max_negatives = max(self.max_negatives, num)
            self.with_negatives += num > 0
            kept.append(pair)
        return kept


def pair_stats(cleaners: list) -> dict:
    """Negative counts of a pair build, for its manifest."""
    return {
        "num_negatives": sum(c.negatives for c in cleaners),
        "max_negatives": max((c.max_negatives for c in cleaners), default=0),
        "pairs_with_negatives": sum(c.with_negatives for c in cleaners),
        "negatives_dropped": sum(c.negatives_dropped for c in cleaners),
    }
