"""Tokenization for the training stream: exact, fast batch encoders.

`make_batch_encoder(tokenizer, max_length)` returns `texts -> int64 numpy arrays` equal to the tokenizer's own
padded, truncated call. For BERT WordPiece tokenizers that is a cached Python path several times faster than
the Rust tokenizer per batch; it is used only after it matched the tokenizer on a set of probe sentences, and
only where `data.fast_tokenizer` asks for it (trainer/tokenizer_choice.py holds the rule of `auto`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class _HFEncoder:
    """The tokenizer's own `__call__`: padding to the longest row, truncation at max_length."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> Arrays:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


class _Cache(dict):
    """A dict that computes missing values, keeping one older generation: `map(cache.__getitem__, keys)` then
    runs in C and calls Python only on a miss. When the young generation is full it becomes the old one;
    entries still in use are promoted back, so frequent keys survive and the rare tail is dropped."""

    def __init__(self, compute: Callable[[str], tuple[int, ...]], max_size: int):
        super().__init__()
        self.compute, self.max_size = compute, max_size
        self.old: dict[str, tuple[int, ...]] = {}

    def __missing__(self, key: str) -> tuple[int, ...]:
        value = self.old.get(key)
        if value is None:
            value = self.compute(key)
        self[key] = value
        return value

    def rotate(self) -> None:
        if len(self) > self.max_size:
            self.old = dict(self)
            self.clear()

    def known(self, key: str) -> bool:
        return key in self or key in self.old


class _WordPieceEncoder:
    """BERT WordPiece with a cache, several times faster than calling the Rust tokenizer, and exact.

    BERT's normalizer works per character, its pre-tokenizer splits on whitespace and isolates punctuation,
    and WordPiece maps each word on its own, so the tokens of a sentence are the concatenation of the tokens
    of its space-separated chunks. Chunks are cached; an unseen printable-ASCII chunk is tokenized here
    (normalization is at most lower(), every non-alphanumeric character is punctuation), every other unseen
    chunk of a batch goes to the Rust tokenizer in one call. Only a prefix cut at a space is tokenized (it
    yields a prefix of the tokens; if it yields fewer than max_length - 2, the whole sentence is used).
    Sentences containing special-token text go to the Rust tokenizer whole. `make_batch_encoder` checks this
    class against the tokenizer's own output before using it.
    """

    _CACHE_MAX = 200_000  # entries per cache generation (~150 bytes each)

    def __init__(self, tokenizer: Any, max_length: int):
        from tokenizers import Tokenizer

        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        normalizer, model, post = spec["normalizer"], spec["model"], spec["post_processor"]
        if (
            normalizer.get("type") != "BertNormalizer"
            or not normalizer.get("clean_text", True)
            or (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
            or tokenizer.padding_side != "right"
            or tokenizer.truncation_side != "right"
            or tokenizer.pad_token_id is None
            or max_length < 2
        ):
            raise ValueError("not a BERT WordPiece tokenizer")
        self.cls_id, self.sep_id = self._specials(post)
        self.lower = bool(normalizer.get("lowercase", True))
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = (self.vocab[model["unk_token"]],)
        self.prefix = model.get("continuing_subword_prefix", "##")
        self.max_word = int(model.get("max_input_chars_per_word", 100))
        self.split = re.compile(r"[a-z0-9]+|[^a-z0-9]" if self.lower else r"[A-Za-z0-9]+|[^A-Za-z0-9]").findall
        added = [t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]
        self.added = re.compile("|".join(map(re.escape, added)), re.IGNORECASE).search if added else None
        self.pad_id = int(tokenizer.pad_token_id)
        self.type_ids = "token_type_ids" in tokenizer.model_input_names
        self.max_length = max_length
        self.limit = max(64, 8 * max_length)  # characters tokenized before checking the prefix sufficed
        self.rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.rust.no_padding()
        self.rust.no_truncation()
        self.reset()

    def reset(self) -> None:
        self.cache = _Cache(self._chunk, self._CACHE_MAX)  # space-free chunk -> token ids
        self.words = _Cache(self._wordpiece, self._CACHE_MAX)  # ASCII word -> token ids

    @staticmethod
    def _specials(post: dict) -> tuple[int, int]:
        if post.get("type") == "BertProcessing":
            return int(post["cls"][1]), int(post["sep"][1])
        if post.get("type") == "TemplateProcessing":
            single = post["single"]
            if (
                len(single) == 3
                and "SpecialToken" in single[0]
                and "Sequence" in single[1]
                and "SpecialToken" in single[2]
                and all(next(iter(p.values()))["type_id"] == 0 for p in single)
            ):
                ids = [post["special_tokens"][single[i]["SpecialToken"]["id"]]["ids"] for i in (0, 2)]
                if all(len(x) == 1 for x in ids):
                    return ids[0][0], ids[1][0]
        raise ValueError("post-processor is not [CLS] $A [SEP]")

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        if len(word) > self.max_word:
            return self.unk
        vocab, out, start = self.vocab, [], 0
        while start < len(word):  # greedy longest match first, as WordPiece does
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in vocab:
                    out.append(vocab[piece])
                    break
                end -= 1
            else:
                return self.unk
            start = end
        return tuple(out)

    def _chunk(self, chunk: str) -> tuple[int, ...]:
        if chunk.isascii() and chunk.isprintable():
            words = self.split(chunk.lower() if self.lower else chunk)
            return tuple(itertools.chain.from_iterable(map(self.words.__getitem__, words)))
        return tuple(self.rust.encode(chunk, add_special_tokens=False).ids)

    def _cut(self, text: str) -> str:
        if len(text) <= self.limit:
            return text
        cut = text.rfind(" ", 0, self.limit)
        return text[:cut] if cut > 0 else text

    def __call__(self, texts: list[str]) -> Arrays:
        n = self.max_length - 2
        cache = self.cache
        cache.rotate()
        self.words.rotate()
        whole = {i for i, t in enumerate(texts) if self.added is not None and self.added(t)}
        cuts = [self._cut(t) for t in texts]
        # One Rust call for all new chunks that are not printable ASCII (only such sentences can hold them).
        unseen = {
            c: None
            for t in cuts
            if not (t.isascii() and t.isprintable())
            for c in t.split(" ")
            if not (c.isascii() and c.isprintable()) and not cache.known(c)
        }
        if unseen:
            for chunk, enc in zip(unseen, self.rust.encode_batch(list(unseen), add_special_tokens=False)):
                cache[chunk] = tuple(enc.ids)
        lookup, join = cache.__getitem__, itertools.chain.from_iterable
        flat: list[int] = []
        lengths: list[int] = []
        for i, (text, cut) in enumerate(zip(texts, cuts)):
            if i in whole:  # special-token text: the Rust tokenizer on the whole sentence
                ids = self.rust.encode(text).ids[1:-1]
            else:
                ids = list(join(map(lookup, cut.split(" "))))
                if len(ids) < n and cut is not text:  # the prefix held too few tokens
                    ids = list(join(map(lookup, text.split(" "))))
            del ids[n:]
            flat.append(self.cls_id)
            flat += ids
            flat.append(self.sep_id)
            lengths.append(len(ids) + 2)
        # Scatter the rows into a padded matrix: True positions of the mask, row-major, are the rows in order.
        mask = np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]
        input_ids = np.full(mask.shape, self.pad_id, dtype=np.int64)
        input_ids[mask] = flat
        out = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
        if self.type_ids:
            out["token_type_ids"] = np.zeros_like(input_ids)
        return out


_PROBES = [
    "",
    "   ",
    "Hello, World! The city's 3rd avenue (1999) -- $5.00 @home #tag 50% a_b `q` ~x^y|z {w} [u] <v> \"quoted\"",
    "UPPERCASE words and MiXeD case, digits 0123456789 and 1,234.5",
    "a" * 120 + " tail",
    "x" * 100 + " " + "y" * 101,
    "naïve café – “curly” quotes and ümlauts",
    "中文字符 and 日本語 mixed with ascii",
    "emoji 😀 here",
    "tab\tseparated\tcolumns",
    "control\x07char and \x7f delete",
    "hello [SEP] world [MASK] and [cls]",
    " ".join(["word"] * 200),
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 12,
    ("The quick brown fox jumps over the lazy dog. " * 30).strip(),
    ("Ça a été très difficile à prévoir, dit-il. " * 20).strip(),
]


def make_batch_encoder(tokenizer: Any, max_length: int, *, fast: bool = True) -> Callable[[list[str]], Arrays]:
    """A function `texts -> {input_ids, attention_mask[, token_type_ids]}` (int64 numpy arrays, right-padded
    to the longest row, truncated at max_length) equal to
    `tokenizer(texts, padding="longest", truncation=True, max_length=max_length)`. With `fast`, the
    WordPiece path is used for BERT-style tokenizers, only after matching the tokenizer's own output on a
    set of probe sentences (`data.fast_tokenizer` decides, see trainer/tokenizer_choice.py)."""
    reference = _HFEncoder(tokenizer, max_length)
    if not fast:
        return reference
    try:
        fast = _WordPieceEncoder(tokenizer, max_length)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.debug("tokenizer fast path off (%s)", exc)
        return reference
    want, got = reference(_PROBES), fast(_PROBES)
    if want.keys() != got.keys() or any(not np.array_equal(want[k], got[k]) for k in want):
        log.warning("fast WordPiece path disagrees with the tokenizer on probe sentences; using the tokenizer")
        return reference
    fast.reset()
    return fast
