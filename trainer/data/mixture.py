"""Several weighted training sources (`data.sources`) and the one factory the engine calls for its stream.

`make_train_stream` turns `data.train` or `data.sources` into a stream: each source is sharded on the fly when
it names a corpus (`<work_dir>/shards`, or `<work_dir>/shards/<name>` per source), its format read from its
manifest (text or pairs), and read by a `TrainStream` or a `PairStream`. One `data.train` gives that stream
itself; `data.sources` gives a `MixedStream` over one stream per source.

`MixedStream` draws, for batch t, from a `random.Random` seeded by (seed, t) alone, so every rank draws the
same and a resume needs only t:

- `batch` mode: one source per batch, with probability weight / sum of weights; the batch is that source's
  next batch (its own shards, epochs, shuffling and rank split). Sources may differ in format: each batch
  goes to the step of its own kind.
- `sample` mode: B row draws per batch; source s gives its next n_s rows (kept over from its last batch when
  there are some); rows are concatenated in source order, token arrays right-padded to the longest row.

Every source runs endlessly (epoch after epoch); a source drawn more often than its size allows is repeated
(upsampled). State (`state_dict`): t, the samples drawn per source, and each source's stream position (in
sample mode the position before its partly used batch, with the rows already used), so a resume continues
exactly. `metrics()` are the samples drawn per source over all ranks, `data/samples/<name>`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from trainer.config import DataConfig
from trainer.data.prepare import prepare_source
from trainer.data.pair_stream import PairStream
from trainer.data.pairs import PAIRS_FORMAT, is_pairs_manifest
from trainer.data.shard_format import MANIFEST, open_shard, parse_manifest, read_manifest
from trainer.data.sources import parse_source
from trainer.data.stream import TrainStream
from trainer.errors import UserError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
_STATE_KIND = "mixture"


def _manifest_of(spec: str) -> Optional[dict]:
    """The manifest describing the shards of `spec`, when there is one (folder, beside .tar files, URL)."""
    source = parse_source(spec)
    with contextlib.suppress(UserError):
        if source.kind == "manifest":
            return read_manifest(source.items[0])
        if source.kind == "tars":
            return read_manifest(Path(source.items[0]).parent)
    if source.kind == "manifest_url":
        try:
            with contextlib.closing(open_shard(source.items[0])) as stream:
                return parse_manifest(stream.read().decode("utf-8"), source.items[0])
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read manifest {source.items[0]}: {exc}") from None
    return None


def source_format(spec: str, configured: str = "auto") -> tuple[str, Optional[int]]:
    """(format, most negatives of a pair or None when unknown) of the shards `spec` names; the manifest decides
    and must agree with an explicit `configured` format; without one, `configured` (auto: text)."""
    manifest = _manifest_of(spec)
    if manifest is None:
        return ("text" if configured == "auto" else configured), None
    found = PAIRS_FORMAT if is_pairs_manifest(manifest) else "text"
    if configured not in ("auto", found):
        raise UserError(f"data.format={configured} but the shards of {spec} hold {found} samples (manifest.json)")
    return found, (int(manifest.get("max_negatives", 0)) if found == PAIRS_FORMAT else None)


def make_train_stream(cfg: DataConfig, tokenizer: Any, *, max_length: int, seed: int, rank: int, world_size: int,
                      work_dir: str | Path, fraternal: Optional[Callable] = None, progress: bool = False) -> Any:
    """The training stream of `cfg` (see the module docstring); corpora are sharded first, under a lock."""
    work_dir = Path(work_dir)
    named = [(s.name, s.weight, s.train) for s in cfg.sources] or [("train", 1.0, cfg.train)]
    resolved = []
    for name, weight, train in named:
        out = work_dir / "shards" / name if cfg.sources else work_dir / "shards"
        spec = prepare_source(train, out, work_dir, shard_size=cfg.shard_size, format=cfg.format, progress=progress)
        resolved.append((name, weight, spec, *source_format(spec, cfg.format)))
    formats = {r[3] for r in resolved}
    if PAIRS_FORMAT in formats and fraternal is not None:
        raise UserError("loss.name=iftcl trains on sentences (identical and fraternal twins); the data holds "
                        "pairs: use loss.name=infonce or softcse")
    if cfg.sources and cfg.source_mixing == "sample" and len(formats) > 1:
        raise UserError("data.source_mixing=sample mixes rows of one format; these sources mix text and pairs "
                        "(use data.source_mixing=batch)")
    known = [r[4] for r in resolved if r[3] == PAIRS_FORMAT]
    if cfg.hard_negatives is None and any(k is None for k in known):
        raise UserError("pair shards without a manifest: set data.hard_negatives (negatives per pair per batch)")
    largest = max(known, default=0)
    common = dict(max_length=max_length, seed=seed, rank=rank, world_size=world_size, work_dir=work_dir)
    streams = []
    for name, weight, spec, fmt, most in resolved:
        data_cfg = replace(cfg, train=spec, sources=[])
        if fmt == PAIRS_FORMAT:
            k = cfg.hard_negatives if cfg.hard_negatives is not None else (
                largest if cfg.source_mixing == "sample" else most)
            stream: Any = PairStream(data_cfg, tokenizer, hard_negatives=k, **common)
        else:
            stream = TrainStream(data_cfg, tokenizer, fraternal=fraternal, **common)
        streams.append((name, weight, stream))
    if not cfg.sources:
        return streams[0][2]
    return MixedStream(streams, mode=cfg.source_mixing, seed=seed, world_size=world_size,
                       batch_size=cfg.batch_size)


def data_metrics(stream: Any) -> dict[str, float]:
    """The stream's own metrics for the train log (`data/samples/<name>` of a mixture; none otherwise)."""
    return stream.metrics() if isinstance(stream, MixedStream) else {}


# ----------------------------------------------------------------------------------------------------------


def _endless(stream: Any) -> Iterator[Batch]:
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        if empty:  # streams refuse data smaller than one global batch; never spin on an empty epoch
            raise RuntimeError("a training source yielded no batch in a whole epoch")


def _rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows [lo, hi) of a batch; `negative_*` arrays hold K rows per pair."""
    num = batch["input_ids"].shape[0]
    k = batch["negative_hash"].shape[0] // num if "negative_hash" in batch else 0
    return {key: (v[lo * k:hi * k] if key.startswith("negative_") else v[lo:hi]) for key, v in batch.items()}


def _concat(parts: list[Batch]) -> Batch:
    """Row-concatenate batches; 2-D token arrays right-padded with 0 to the longest (attention_mask 0 there,
    so no token attends to a pad and the poolers ignore it: its id does not matter)."""
    if len(parts) == 1:
        return parts[0]
    if any(p.keys() != parts[0].keys() for p in parts):
        raise UserError("data.source_mixing=sample: the sources' batches differ in layout (formats or tokenizer "
                        "outputs); use data.source_mixing=batch")
    out = {}
    for key in parts[0]:
        arrays = [p[key] for p in parts]
        if arrays[0].dim() == 2:
            width = max(a.shape[1] for a in arrays)
            arrays = [torch.nn.functional.pad(a, (0, width - a.shape[1])) for a in arrays]
        out[key] = torch.cat(arrays)
    return out


class MixedStream:
    """Batches drawn from several streams by weight; see the module docstring. `streams`: (name, weight,
    stream) with streams of `data.batch_size` rows (anything with `__iter__`, `state_dict`,
    `load_state_dict` and `batches_per_epoch`)."""

    def __init__(self, streams: Sequence[tuple[str, float, Any]], *, mode: str = "batch", seed: int = 0,
                 world_size: int = 1, batch_size: int = 1):
        if mode not in ("batch", "sample"):
            raise ValueError(f"mode must be batch or sample, got {mode!r}")
        if not streams or any(w <= 0 for _, w, _ in streams):
            raise ValueError("need at least one stream, every weight > 0")
        self.names = [n for n, _, _ in streams]
        self.weights = [float(w) for _, w, _ in streams]
        self.streams = [s for _, _, s in streams]
        self.mode, self.seed, self.world_size, self.batch_size = mode, seed, world_size, batch_size
        self.drawn = 0
        """Batches drawn so far (t)."""
        self.counts = dict.fromkeys(self.names, 0)
        """Samples drawn per source, over all ranks."""
        self._iters: Optional[list[Iterator[Batch]]] = None
        # sample mode: per source, its partly used batch, the rows used, and its stream position before it
        self._pending: list[Optional[Batch]] = [None] * len(self.streams)
        self._used = [0] * len(self.streams)
        self._before: list[Optional[dict]] = [None] * len(self.streams)

    def _rng(self, t: int) -> random.Random:
        return random.Random(f"mixture:{self.seed}:{t}")

    def draw(self, t: int) -> Counter:
        """{source index: rows} of batch t: every row from one source (batch mode) or one draw per row."""
        k = 1 if self.mode == "batch" else self.batch_size
        picks = self._rng(t).choices(range(len(self.streams)), weights=self.weights, k=k)
        return Counter({picks[0]: self.batch_size} if self.mode == "batch" else picks)

    def _take(self, s: int, num: int) -> list[Batch]:
        parts = []
        while num:
            if self._pending[s] is None:
                self._before[s] = self.streams[s].state_dict()
                self._pending[s] = next(self._iters[s])  # type: ignore[index]
            batch, used = self._pending[s], self._used[s]
            size = batch["input_ids"].shape[0]
            if used == 0 and num >= size:
                parts.append(batch)
                got = size
            else:
                got = min(num, size - used)
                parts.append(_rows(batch, used, used + got))
            num -= got
            self._used[s] = used + got
            if self._used[s] == size:
                self._pending[s], self._used[s] = None, 0
        return parts

    def __iter__(self) -> Iterator[Batch]:
        if self._iters is None:
            self._iters = [_endless(s) for s in self.streams]
        while True:
            rows = self.draw(self.drawn)
            if self.mode == "batch":
                (s, num), = rows.items()
                batch = next(self._iters[s])
            else:
                batch = _concat([p for s in sorted(rows) for p in self._take(s, rows[s])])
            self.drawn += 1
            for s, num in rows.items():
                self.counts[self.names[s]] += num * self.world_size
            yield batch

    def metrics(self) -> dict[str, float]:
        return {f"data/samples/{name}": float(count) for name, count in self.counts.items()}

    def batches_per_epoch(self) -> int:
        """Batches in one pass over every source's current epoch (each source still cycles on its own)."""
        return sum(s.batches_per_epoch() for s in self.streams)

    # -- resume ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        positions, used = {}, {}
        for s, name in enumerate(self.names):
            pending = self._pending[s] is not None
            positions[name] = self._before[s] if pending else self.streams[s].state_dict()
            used[name] = self._used[s] if pending else 0
        return {"kind": _STATE_KIND, "version": 1, "mode": self.mode, "seed": self.seed, "drawn": self.drawn,
                "counts": dict(self.counts), "weights": dict(zip(self.names, self.weights)),
                "sources": positions, "used": used}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Continue after the position in `state` (from `state_dict`); None keeps the start."""
        if not state:
            return
        if state.get("kind") != _STATE_KIND or not isinstance(state.get("sources"), dict):
            raise UserError("the checkpoint's data position is not a data.sources mixture (data.train vs "
                            "data.sources changed?)")
        if set(state["sources"]) != set(self.names):
            raise UserError(f"data.sources changed: the checkpoint has {sorted(state['sources'])}, the config "
                            f"{sorted(self.names)}")
        layout = {"mode": self.mode, "seed": self.seed, "weights": dict(zip(self.names, self.weights))}
        changed = [k for k, v in layout.items() if state.get(k) != v]
        if changed:
            log.warning("data resume is approximate (the mixture draws differently): %s changed", ", ".join(changed))
        self.drawn = int(state["drawn"])
        self.counts = {name: int(state["counts"].get(name, 0)) for name in self.names}
        self._iters = None
        for s, name in enumerate(self.names):
            self.streams[s].load_state_dict(state["sources"][name])
            self._pending[s], self._used[s], self._before[s] = None, 0, None
        used = state.get("used", {})
        if any(used.values()):
            self._iters = [_endless(s) for s in self.streams]
            for s, name in enumerate(self.names):
                if used.get(name):  # re-read the partly used batch and skip the rows already taken
                    self._take(s, int(used[name]))

