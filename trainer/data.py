"""Training stream: webdataset shards -> exact, resumable, rank- and worker-split batches of token ids.

Pipeline of one epoch e (R ranks, W DataLoader workers per rank, batch size B, N samples in S shards):

1. shard order: a permutation of the shards seeded by (seed, e); in `resample` mode, shards drawn with
   replacement (seeded the same way) until the draws hold >= N samples.
2. global index: the samples of the ordered shards, concatenated, are numbered 0..N_e-1.
3. node split at the sample level: K = N_e // (R*B) batches per rank; rank r takes the contiguous range
   [r*K*B, (r+1)*K*B). Every rank yields exactly K batches, whatever the shard sizes, so the gather never
   deadlocks. The tail [R*K*B, N_e) (< R*B samples) is dropped this epoch; the next epoch's permutation puts
   other samples at the tail, so nothing is dropped systematically.
4. worker split: batch i of a rank comes from logical worker i % W (torch's DataLoader serves workers round
   robin, so the global order is deterministic); worker w owns the contiguous sample range of its batches.
5. per worker: read its shard segments (local files or webdataset URLs), shuffle buffer seeded by
   (seed, e, r, w), optional fraternal view (rng seeded by (seed, e, key)), tokenize, batches of exactly B.

Resume: `state_dict()` is (epoch, batches the consumer has taken in it), the same on every rank.
`load_state_dict` rebuilds each worker's stream and skips its consumed samples without tokenizing them.
Exact resume needs the same world size, workers, batch size, shuffle buffer and shards; otherwise the
position is carried over approximately (same epoch, same fraction) with a warning.

Sources (`DataConfig.train`): a shard folder with manifest.json; a glob / brace list of .tar files (counts from a
manifest beside them, else one read each, cached in work_dir/shard_counts.json); webdataset URLs (`pipe:...`,
http(s), ...; brace-expanded and opened by webdataset's `expand_urls` / `gopen`), or one URL naming a
manifest.json, whose shard URLs are the same URL with the shard's name; a text / .gz / jsonl corpus, sharded
once into work_dir/shards. Tar parsing is our own streaming reader (trainer.shards): it skips samples without
decoding them and reports truncation, which the exact split and the bad-shard policy need.

Bad shards (`on_error`): missing, empty or truncated (size differs from manifest.json) shards are found when
the stream is built; `raise` stops with a UserError naming the shard, `skip` logs, records it in
`skipped_shards` and leaves it out (the split stays exact over the rest). A shard that fails only while being
read (corrupt header, a URL that errors) is reported the same way; under `skip` the worker tops its range up
by re-reading other shards of the epoch, so every rank still yields its K batches.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import os
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.errors import UserError
from trainer.shards import (
    DEFAULT_MAX_CHARS,
    MANIFEST,
    ShardError,
    build_shards,
    count_samples,
    expand_inputs,
    iter_tar_samples,
    manifest_matches,
    open_shard,
    parse_manifest,
    read_manifest,
)

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_STATE_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """One readable shard: what `open_shard` opens, a name for messages, and its sample count."""

    url: str
    name: str
    num_samples: int


# ----------------------------------------------------------------------------------------------------------
# Shard list resolution


def _is_url(item: str) -> bool:
    return bool(_SCHEME_RE.match(item)) and not item.startswith("file:")


@contextlib.contextmanager
def _locked(work_dir: Path) -> Iterator[None]:
    """Serialise on-the-fly sharding and counting between the ranks sharing `work_dir`."""
    import fcntl

    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fh = open(work_dir / ".data.lock", "a+")
    except OSError as exc:
        raise UserError(f"cannot use {work_dir} for shards and shard counts: {exc.strerror or exc}") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Resolver:
    """Turns `data.train` into a list of `Shard`s with sample counts, applying the bad-shard policy."""

    def __init__(self, on_error: str, work_dir: Path, shard_size: int, progress: bool):
        self.on_error = on_error
        self.work_dir = work_dir
        self.shard_size = shard_size
        self.progress = progress
        self.skipped: list[dict] = []
        self.shards: list[Shard] = []

    def reject(self, name: str, reason: str) -> None:
        if self.on_error == "raise":
            raise ShardError(name, reason)
        log.warning("skipping shard %s: %s", name, reason)
        self.skipped.append({"shard": name, "reason": reason})

    def add(self, url: str, name: str, count: int) -> None:
        if count == 0:
            self.reject(name, "empty (no samples with a txt field)")
        else:
            self.shards.append(Shard(url, name, count))

    def resolve(self, spec: str) -> list[Shard]:
        import webdataset as wds

        spec = spec.strip()
        if not spec:
            raise UserError("data.train is empty: set it to a shard folder, .tar pattern, URL or text file")
        items = wds.shardlists.expand_urls(spec)
        if any(_is_url(i) for i in items):
            if not all(_is_url(i) for i in items):
                raise UserError(f"data.train mixes URLs and local paths: {spec}")
            if len(items) == 1 and "manifest.json" in items[0]:
                self._from_manifest_url(items[0])
            else:
                self._from_urls(items)
            return self.shards
        paths: list[str] = []
        for item in items:
            item = re.sub(r"^file://?", "/", item) if item.startswith("file:") else item
            if any(c in item for c in "*?["):
                paths.extend(str(p) for p in expand_inputs([item]))
            else:
                paths.append(item)
        if len(paths) == 1 and paths[0].endswith(MANIFEST):
            self._from_manifest(Path(paths[0]).parent)
            return self.shards
        if len(paths) == 1 and os.path.isdir(paths[0]):
            folder = Path(paths[0])
            if (folder / MANIFEST).is_file():
                self._from_manifest(folder)
                return self.shards
            paths = sorted(str(p) for p in folder.glob("*.tar"))
            if not paths:
                raise UserError(f"data.train folder {folder} holds neither {MANIFEST} nor .tar shards")
        if all(p.endswith(_TAR_SUFFIXES) for p in paths):
            self._from_local_tars(paths)
        elif any(p.endswith(_TAR_SUFFIXES) for p in paths):
            raise UserError(f"data.train mixes .tar shards and text files: {spec}")
        else:
            self._from_manifest(self._shard_on_the_fly(paths))
        return self.shards

    def _from_manifest(self, folder: Path) -> None:
        manifest = read_manifest(folder)
        for entry in manifest["shards"]:
            path = folder / entry["name"]
            try:
                size = path.stat().st_size
            except OSError:
                self.reject(str(path), "missing (listed in manifest.json)")
                continue
            if "bytes" in entry and size != entry["bytes"]:
                self.reject(str(path), f"corrupt or truncated: {size} bytes, manifest.json says {entry['bytes']}")
                continue
            self.add(str(path), str(path), int(entry["num_samples"]))

    def _from_manifest_url(self, url: str) -> None:
        try:
            with contextlib.closing(open_shard(url)) as stream:
                manifest = parse_manifest(stream.read().decode("utf-8"), url)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read manifest {url}: {exc}") from None
        head, _, tail = url.rpartition("manifest.json")
        for entry in manifest["shards"]:
            shard_url = head + entry["name"] + tail  # same command/host, the shard's name for the manifest's
            self.add(shard_url, shard_url, int(entry["num_samples"]))

    def _count(self, items: list[tuple[str, str, str]]) -> dict[str, int | str]:
        """{cache key: sample count or failure reason} for (url, name, cache key) items, one read of each
        shard not yet in work_dir/shard_counts.json."""
        cache_file = self.work_dir / "shard_counts.json"
        with _locked(self.work_dir):
            try:
                cache = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                cache = {}
            fresh = [i for i in items if i[2] not in cache]
            if fresh:
                log.info("counting samples in %d shards (one read each; a manifest.json avoids this)", len(fresh))
                for url, name, key in fresh:
                    try:
                        cache[key] = count_samples(url, name)
                    except ShardError as exc:
                        cache[key] = exc.reason
                tmp = cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(cache, indent=1))
                os.replace(tmp, cache_file)
        return cache

    def _add_counted(self, url: str, name: str, count: int | str) -> None:
        if isinstance(count, str):
            self.reject(name, count)
        else:
            self.add(url, name, count)

    def _from_urls(self, urls: list[str]) -> None:
        counts = self._count([(u, u, u) for u in urls])
        for url in urls:
            self._add_counted(url, url, counts[url])

    def _from_local_tars(self, paths: list[str]) -> None:
        # Counts come from a manifest.json beside the shards when it lists them at the same size; otherwise
        # each shard is read once and its count cached by path, size and mtime.
        listed: dict[str, dict] = {}
        for folder in {os.path.dirname(os.path.abspath(p)) for p in paths}:
            with contextlib.suppress(UserError):
                for entry in read_manifest(folder)["shards"]:
                    listed[os.path.join(folder, entry["name"])] = entry
        known: dict[str, int | str] = {}
        todo: list[tuple[str, str, str]] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                known[path] = "missing"
                continue
            entry = listed.get(os.path.abspath(path))
            if entry is not None and entry.get("bytes") == st.st_size:
                known[path] = int(entry["num_samples"])
            else:
                todo.append((path, path, f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"))
        if todo:
            counts = self._count(todo)
            known.update({path: counts[key] for path, _, key in todo})
        for path in paths:
            self._add_counted(path, path, known[path])

    def _shard_on_the_fly(self, files: list[str]) -> Path:
        out = self.work_dir / "shards"
        options = dict(shard_size=self.shard_size, field=None, dedup=False, min_chars=1, max_chars=DEFAULT_MAX_CHARS)
        inputs = expand_inputs(files)
        with _locked(self.work_dir):
            if manifest_matches(out, inputs, **options):
                log.info("reusing shards in %s (inputs unchanged)", out)
            else:
                log.info("sharding %s into %s", ", ".join(map(str, inputs)), out)
                build_shards(inputs, out, progress=self.progress, **options)  # type: ignore[arg-type]
        return out


def resolve_shards(
    spec: str, *, work_dir: str | Path, on_error: str = "raise", shard_size: int = 10_000, progress: bool = False
) -> tuple[list[Shard], list[dict]]:
    """Shards named by `spec` (see `DataConfig.train`) with sample counts, and the shards skipped under
    `on_error="skip"` as {"shard", "reason"} records. A text corpus is sharded into `work_dir/shards`."""
    resolver = _Resolver(on_error, Path(work_dir), shard_size, progress)
    shards = resolver.resolve(spec)
    if not shards:
        raise UserError(f"no readable shards in data.train={spec!r} ({len(resolver.skipped)} skipped)")
    return shards, resolver.skipped


# ----------------------------------------------------------------------------------------------------------
# Tokenization: exact, fast batch encoders


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


def make_batch_encoder(tokenizer: Any, max_length: int) -> Callable[[list[str]], Arrays]:
    """A function `texts -> {input_ids, attention_mask[, token_type_ids]}` (int64 numpy arrays, right-padded
    to the longest row, truncated at max_length) equal to
    `tokenizer(texts, padding="longest", truncation=True, max_length=max_length)`; the
    fast WordPiece path is used only for BERT-style tokenizers and only after matching the tokenizer's own
    output on a set of probe sentences."""
    reference = _HFEncoder(tokenizer, max_length)
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


# ----------------------------------------------------------------------------------------------------------
# The stream


@dataclass
class _EpochPlan:
    order: list[int]  # shard indices in this epoch's order
    starts: list[int]  # global index of the first sample of order[i]; starts[-1] = samples this epoch
    num_batches: int  # K: batches per rank this epoch


def _shuffled(samples: Iterator[tuple[str, str]], size: int, rng: random.Random) -> Iterator[tuple[str, str]]:
    """Shuffle buffer: once `size` samples are held, each new one replaces a random held one, which is emitted."""
    buf: list[tuple[str, str]] = []
    rand = rng.random
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = int(rand() * size)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


class TrainStream:
    """Iterable of training batches for one rank; see the module docstring for the pipeline and guarantees.

    Each batch holds `input_ids`, `attention_mask` (+ `token_type_ids` when the tokenizer makes them) of
    exactly `cfg.batch_size` rows and, when `fraternal` is given, the same keys prefixed `fraternal_` for the
    token-augmented view. Iterating yields the rest of the current epoch; iterating again starts the next one
    (in `cfg.resample` mode iteration never ends). Every rank yields the same number of batches per epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        *,
        max_length: int,
        seed: int,
        rank: int,
        world_size: int,
        work_dir: str | Path,
        fraternal: Optional[Callable[[str, random.Random], str]] = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.fraternal = fraternal
        self.shards, skipped = resolve_shards(
            cfg.train, work_dir=work_dir, on_error=cfg.on_error, shard_size=cfg.shard_size, progress=rank == 0
        )
        self.skipped_shards: list[dict] = list(skipped)
        """Shards left out so far under `on_error: skip`, as {"shard", "reason"} records."""
        self.num_samples = sum(s.num_samples for s in self.shards)
        if self.num_samples < world_size * cfg.batch_size:
            raise UserError(
                f"data.train has {self.num_samples} samples, fewer than one global batch "
                f"(world_size {world_size} x batch_size {cfg.batch_size})"
            )
        self._encode = make_batch_encoder(tokenizer, max_length)
        self._workers = max(1, cfg.num_workers)  # logical workers; 0 DataLoader workers read in-process
        self._plans: dict[int, _EpochPlan] = {}
        self._epoch = 0
        self._batch = 0

    # -- epoch layout ------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> _EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            rng = random.Random(f"shards:{self.seed}:{epoch}")
            if self.cfg.resample:
                order, total = [], 0
                while total < self.num_samples:
                    order.append(rng.randrange(len(self.shards)))
                    total += self.shards[order[-1]].num_samples
            else:
                order = list(range(len(self.shards)))
                rng.shuffle(order)
            starts = [0, *itertools.accumulate(self.shards[i].num_samples for i in order)]
            plan = _EpochPlan(order, starts, starts[-1] // (self.world_size * self.cfg.batch_size))
            if len(self._plans) > 4:
                self._plans.clear()
            self._plans[epoch] = plan
        return plan

    def batches_per_epoch(self, epoch: Optional[int] = None) -> int:
        """Batches every rank yields in `epoch` (default: the current one)."""
        return self._plan(self._epoch if epoch is None else epoch).num_batches

    def _worker_range(self, plan: _EpochPlan, worker: int) -> tuple[int, int]:
        """(first global sample index, number of batches) of a logical worker of this rank."""
        counts = [len(range(w, plan.num_batches, self._workers)) for w in range(self._workers)]
        start = (self.rank * plan.num_batches + sum(counts[:worker])) * self.cfg.batch_size
        return start, counts[worker]

    def _segments(self, plan: _EpochPlan, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard index, first, end) sample ranges covering global indices [start, stop)."""
        out = []
        pos = bisect.bisect_right(plan.starts, start) - 1
        while start < stop:
            first = plan.starts[pos]
            end = min(stop, plan.starts[pos + 1])
            if end > start:
                out.append((plan.order[pos], start - first, end - first))
            start = end
            pos += 1
        return out

    # -- reading -----------------------------------------------------------------------------------------

    def _read(self, shard: Shard, lo: int, hi: int) -> Iterator[tuple[str, str]]:
        try:
            stream = open_shard(shard.url)
        except OSError as exc:
            raise ShardError(shard.name, f"cannot open ({exc})") from None
        seen = 0
        try:
            for key, data in iter_tar_samples(stream, shard.name):
                if seen >= lo:
                    yield key, data.decode("utf-8", "replace").strip()
                seen += 1
                if seen >= hi:
                    break
        except (OSError, EOFError, zlib.error) as exc:
            raise ShardError(shard.name, f"read error ({exc})") from None
        finally:
            with contextlib.suppress(Exception):  # a pipe closed early exits with SIGPIPE; read errors came first
                stream.close()
        if seen < hi:
            reason = f"ends after {seen} samples, expected {shard.num_samples} (truncated or changed)"
            raise ShardError(shard.name, reason)

    def _samples(self, plan: _EpochPlan, start: int, count: int, notices: list[dict]) -> Iterator[tuple[str, str]]:
        """Exactly `count` samples from global index `start` on (topped up from other shards under skip)."""
        bad: set[int] = set()
        missing = 0

        def failed(index: int, exc: ShardError) -> None:
            if self.cfg.on_error == "raise":
                raise exc
            log.warning("skipping rest of %s", exc)
            bad.add(index)
            notices.append({"shard": exc.shard, "reason": exc.reason})

        for index, lo, hi in self._segments(plan, start, start + count):
            got = 0
            try:
                for sample in self._read(self.shards[index], lo, hi):
                    got += 1
                    yield sample
            except ShardError as exc:
                failed(index, exc)
                missing += hi - lo - got
        while missing:  # only under skip: refill from the epoch's other shards so the batch count holds
            progress = False
            for index in dict.fromkeys(plan.order):
                if index in bad or not missing:
                    continue
                try:
                    for sample in self._read(self.shards[index], 0, min(missing, self.shards[index].num_samples)):
                        missing -= 1
                        progress = True
                        yield sample
                except ShardError as exc:
                    failed(index, exc)
            if not progress:
                raise UserError(f"no readable shard left to fill {missing} samples (data.train={self.cfg.train!r})")

    def _encode_chunk(self, chunk: list[tuple[str, str]], epoch: int) -> Arrays:
        texts = [text for _, text in chunk]
        batch = self._encode(texts)
        if self.fraternal is not None:
            views = [self.fraternal(t, random.Random(f"{self.seed}:{epoch}:{k}")) for k, t in chunk]
            batch.update({f"fraternal_{k}": v for k, v in self._encode(views).items()})
        return batch

    def _worker_batches(self, epoch: int, worker: int, skip: int) -> Iterator[dict]:
        """Batches of one logical worker in `epoch`, after skipping its first `skip` (not tokenized)."""
        plan = self._plan(epoch)
        start, num = self._worker_range(plan, worker)
        size = self.cfg.batch_size
        notices: list[dict] = []
        samples = self._samples(plan, start, num * size, notices)
        if self.cfg.shuffle_buffer > 0:
            rng = random.Random(f"samples:{self.seed}:{epoch}:{self.rank}:{worker}")
            samples = _shuffled(samples, self.cfg.shuffle_buffer, rng)
        try:
            for _ in itertools.islice(samples, skip * size):
                pass
            for _ in range(num - skip):
                chunk = list(itertools.islice(samples, size))
                assert len(chunk) == size, "internal error: worker range is not a whole number of batches"
                batch: dict = self._encode_chunk(chunk, epoch)
                if notices:
                    batch["__skipped__"] = notices[:]
                    notices.clear()
                yield batch
        finally:
            samples.close()

    # -- iteration ---------------------------------------------------------------------------------------

    def _iter_epoch(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._batch
        if self.cfg.num_workers == 0:
            source: Iterator[dict] = self._worker_batches(epoch, 0, start)
        else:
            loader = torch.utils.data.DataLoader(
                _EpochDataset(self, epoch, start), batch_size=None, num_workers=self.cfg.num_workers
            )
            source = iter(loader)
        try:
            for item in source:
                batch = item.value if isinstance(item, _Packed) else item
                if "__error__" in batch:
                    raise UserError(batch["__error__"])
                self.skipped_shards.extend(batch.pop("__skipped__", []))
                self._batch += 1
                yield {k: torch.from_numpy(v) for k, v in batch.items()}
        finally:
            # Stop reading now: closes tar files in-process, or shuts the DataLoader's workers down.
            stop = getattr(source, "close", None) or getattr(source, "_shutdown_workers", None)
            if stop is not None:
                stop()
        self._epoch, self._batch = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self._batch >= self._plan(self._epoch).num_batches:
                self._epoch, self._batch = self._epoch + 1, 0
            yield from self._iter_epoch()
            if not self.cfg.resample:
                return

    # -- resume ------------------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self._workers,
            "batch_size": self.cfg.batch_size,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "resample": self.cfg.resample,
            "num_samples": self.num_samples,
        }

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (before it is drawn)."""
        return self._epoch + (self._batch >= self._plan(self._epoch).num_batches)

    def state_dict(self) -> dict:
        """JSON-able position after the batches consumed so far (identical on every rank)."""
        epoch, batch = self._epoch, self._batch
        if batch >= self._plan(epoch).num_batches:
            epoch, batch = epoch + 1, 0
        return {"version": _STATE_VERSION, "epoch": epoch, "batch": batch, **self._layout()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Continue after the position in `state` (from `state_dict`); None keeps the start."""
        if not state:
            return
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"data state is not a TrainStream state: {state!r}") from None
        layout = self._layout()
        changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if changed:
            # Another topology orders samples differently: keep the epoch and the fraction of it consumed.
            seen = batch * int(state.get("batch_size", self.cfg.batch_size)) * int(state.get("world_size", 1))
            batch = seen // (self.cfg.batch_size * self.world_size)
            log.warning("data resume is approximate (samples may repeat or be skipped this epoch): %s changed",
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        self._epoch, self._batch = epoch, min(batch, self._plan(epoch).num_batches)


class _EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of a TrainStream from batch `start` on, for DataLoader workers.

    DataLoader worker u plays logical worker (u + start) % W: the loader asks workers round robin from worker
    0, and batch `start` belongs to logical worker start % W, so this rotation keeps the global batch order
    of an uninterrupted epoch. Errors travel as a marker batch so the main process raises a clean UserError.
    Batches travel as numpy arrays inside `_Packed`, which the DataLoader passes through untouched: pickled
    arrays cost ~40% less than tensors moved through shared memory (one fd handshake per tensor).
    """

    def __init__(self, stream: TrainStream, epoch: int, start: int):
        self.stream, self.epoch, self.start = stream, epoch, start

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        worker = ((info.id if info is not None else 0) + self.start) % workers
        done = len(range(worker, self.start, workers))  # batches of this worker the consumer already has
        try:
            for batch in self.stream._worker_batches(self.epoch, worker, done):
                yield _Packed(batch)
        except UserError as exc:
            yield _Packed({"__error__": str(exc)})


class _Packed:
    """Opaque to the DataLoader's `default_convert`, so its numpy payload is pickled as is."""

    __slots__ = ("value",)

    def __init__(self, value: dict):
        self.value = value
