"""Sentence views for contrastive training.

The identical twin needs no code here: it is the same sentence encoded with another dropout mask. The
fraternal twin (IFTCL) is a token-level edit of the sentence on whitespace-separated words:

1. deletion: each word is dropped with probability ``deletion_rate``;
2. repetition: each surviving word is written twice with probability ``repetition_rate``;
3. span swap: with probability ``swap_rate`` two non-overlapping spans of 1..``max_span`` words trade
   places.

All randomness comes from the ``random.Random`` the caller passes, in a fixed order of draws, so a seeded
generator gives the same twin on every run and every worker. The result is never empty for a non-empty
sentence: if deletion removed every word, one word (chosen by the rng) is kept. Words are re-joined with
single spaces.

An edit can leave the words unchanged (no word deleted or repeated, no swap), which makes the fraternal twin a
second identical twin: at the default rates 11.8% of the lines of SimCSE's wiki1m (``data/wiki1m_head10k.txt``,
many short lines), 3.6% of ``enwiki_1m_sentences``. ``max_redraws`` re-applies the edit, with the same
generator, up to that many more times until the words differ (0 keeps the first draw, the original
behaviour); 3 re-draws leave 1.9% and 0.02% (mostly one-word lines, which only a repetition can change).
``unchanged_views`` finds, on the tokenized batch, the rows that still equal their anchor (after re-draws
and truncation, i.e. what the model sees): the loss logs them and can leave them out of the Twins term.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.config import AugmentConfig


class FraternalAugmenter:
    """``augmenter(text, rng) -> text``; a plain class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, cfg: AugmentConfig) -> None:
        for name in ("deletion_rate", "repetition_rate", "swap_rate"):
            value = getattr(cfg, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {value}")
        if cfg.max_span < 1:
            raise ValueError(f"augment.max_span must be >= 1, got {cfg.max_span}")
        self.deletion_rate = float(cfg.deletion_rate)
        self.repetition_rate = float(cfg.repetition_rate)
        self.swap_rate = float(cfg.swap_rate)
        self.max_span = int(cfg.max_span)
        self.max_redraws = int(getattr(cfg, "max_redraws", 0))
        if self.max_redraws < 0:
            raise ValueError(f"augment.max_redraws must be >= 0, got {self.max_redraws}")

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if not words:  # nothing to edit: an empty/blank sentence is returned unchanged
            return text
        for _ in range(1 + self.max_redraws):
            edited = self._swap(self._repeat(self._delete(words, rng), rng), rng)
            if edited != words:
                break
        return " ".join(edited)

    def _delete(self, words: list[str], rng: random.Random) -> list[str]:
        if self.deletion_rate == 0.0:
            return words
        kept = [w for w in words if rng.random() >= self.deletion_rate]
        return kept or [words[rng.randrange(len(words))]]

    def _repeat(self, words: list[str], rng: random.Random) -> list[str]:
        if self.repetition_rate == 0.0:
            return words
        out: list[str] = []
        for w in words:
            out.append(w)
            if rng.random() < self.repetition_rate:
                out.append(w)
        return out

    def _swap(self, words: list[str], rng: random.Random) -> list[str]:
        n = len(words)
        if self.swap_rate == 0.0 or n < 2 or rng.random() >= self.swap_rate:
            return words
        len_a = rng.randint(1, min(self.max_span, n - 1))
        len_b = rng.randint(1, min(self.max_span, n - len_a))
        start_a = rng.randint(0, n - len_a - len_b)
        start_b = rng.randint(start_a + len_a, n - len_b)  # after span a: the spans never overlap
        span_a, span_b = words[start_a:start_a + len_a], words[start_b:start_b + len_b]
        return words[:start_a] + span_b + words[start_a + len_a:start_b] + span_a + words[start_b + len_b:]


def unchanged_views(batch: dict, prefix: str = "fraternal_") -> torch.Tensor:
    """(B,) bool: rows whose ``prefix`` view has exactly the anchor's tokens (each view is padded to its own
    length, so both are right-padded to a common width and compared under their masks). No host sync."""
    ids_a, mask_a = batch["input_ids"], batch["attention_mask"]
    ids_f, mask_f = batch[prefix + "input_ids"], batch[prefix + "attention_mask"]
    width = max(ids_a.shape[1], ids_f.shape[1])

    def padded(x):
        return F.pad(x, (0, width - x.shape[1]))

    same_mask = (padded(mask_a) == padded(mask_f)).all(dim=1)
    same_ids = (padded(ids_a * mask_a) == padded(ids_f * mask_f)).all(dim=1)
    return same_mask & same_ids


def make_fraternal(cfg: AugmentConfig) -> Callable[[str, random.Random], str]:
    """The fraternal-twin augmentation configured by ``cfg`` (see the module docstring)."""
    return FraternalAugmenter(cfg)
