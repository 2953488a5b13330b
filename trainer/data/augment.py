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
"""

from __future__ import annotations

import random
from typing import Callable

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

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if not words:  # nothing to edit: an empty/blank sentence is returned unchanged
            return text
        words = self._delete(words, rng)
        words = self._repeat(words, rng)
        words = self._swap(words, rng)
        return " ".join(words)

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


def make_fraternal(cfg: AugmentConfig) -> Callable[[str, random.Random], str]:
    """The fraternal-twin augmentation configured by ``cfg`` (see the module docstring)."""
    return FraternalAugmenter(cfg)
