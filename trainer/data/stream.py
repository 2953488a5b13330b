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

The stream only reads shards (resolved by trainer.data.sources); a text corpus is sharded beforehand by
`trainer.data.prepare.prepare_train_source`. Bad shards (`on_error`): missing, empty or truncated shards are
found when the stream is built. A shard that fails only while being read (corrupt header, a URL that errors)
is reported the same way; under `skip` the worker tops its range up by re-reading other shards of the epoch,
so every rank still yields its K batches. DataLoader workers hand the main process typed records: a
`WorkerBatch` (arrays + the shards skipped since the last batch) or a `WorkerError` (a clean UserError).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from trainer.config import DataConfig
from trainer.data.shard_format import ShardError, iter_tar_samples, open_shard
from trainer.data.sources import Shard, resolve_shards
from trainer.data.tokenize import Arrays, make_batch_encoder
from trainer.data.verify import check_sha256
from trainer.errors import UserError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# What DataLoader workers send. Plain dataclasses are opaque to the DataLoader's `default_convert`, so their
# numpy payload is pickled as is: pickled arrays cost ~40% less than tensors moved through shared memory
# (one fd handshake per tensor).


@dataclass
class WorkerBatch:
    """One batch of a worker, as int64 numpy arrays keyed like the batches `TrainStream` yields."""

    arrays: Arrays
    skipped: list[dict] = field(default_factory=list)
    """Shards the worker gave up on (under `on_error: skip`) since its previous batch, as {"shard", "reason"}."""


@dataclass
class WorkerError:
    """A worker stopped on a user error (a bad shard under `on_error: raise`, nothing left to refill from);
    the main process raises it as a UserError with this message."""

    message: str


WorkerRecord = Union[WorkerBatch, WorkerError]


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
    `cfg.train` must name shards (a text corpus goes through `prepare_train_source` first); `work_dir` holds
    the cache of shard sample counts.
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
        self.shards, skipped = resolve_shards(cfg.train, work_dir=work_dir, on_error=cfg.on_error, verify=cfg.verify)
        self.skipped_shards: list[dict] = list(skipped)
        """Shards left out so far under `on_error: skip`, as {"shard", "reason"} records."""
        self.num_samples = sum(s.num_samples for s in self.shards)
        if self.num_samples < world_size * cfg.batch_size:
            raise UserError(
                f"data.train has {self.num_samples} samples, fewer than one global batch "
                f"(world_size {world_size} x batch_size {cfg.batch_size})"
            )
        self._encode = make_batch_encoder(tokenizer, max_length, fast=cfg.fast_tokenizer != "off")
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

    def _tar_samples(self, stream: Any, shard: str) -> Iterator[tuple[str, Any]]:
        """(key, raw sample) of a shard; a subclass reads another sample layout (trainer.data.pair_stream)."""
        return iter_tar_samples(stream, shard)

    def _decode(self, key: str, raw: Any, shard: str) -> Any:
        """A raw sample (from `_tar_samples`) as the payload `_encode_chunk` takes: here the sentence."""
        return raw.decode("utf-8", "replace").strip()

    def _read(self, shard: Shard, lo: int, hi: int) -> Iterator[tuple[str, str]]:
        """Samples [lo, hi) of `shard`. A range that ends with the shard reads on to the end of the archive
        before yielding its last sample, so a shard holding more samples than listed is an error, not a
        silent loss of the rest (and consumers that stop after the last sample still get the check)."""
        if self.cfg.verify == "sha256" and shard.sha256 is not None:
            reason = check_sha256(shard.url, shard.sha256)  # cached: hashes only a file changed since
            if reason is not None:
                raise ShardError(shard.name, reason)
        try:
            stream = open_shard(shard.url)
        except OSError as exc:
            raise ShardError(shard.name, f"cannot open ({exc})") from None
        to_end = hi >= shard.num_samples
        seen = 0
        last: Optional[tuple[str, str]] = None
        try:
            for key, data in self._tar_samples(stream, shard.name):
                if seen >= hi:
                    raise ShardError(shard.name, f"holds more than the {shard.num_samples} samples "
                                                 f"{shard.origin} lists (changed, or a wrong count)")
                if last is not None:
                    yield last
                    last = None
                if seen >= lo:
                    last = key, self._decode(key, data, shard.name)
                seen += 1
                if seen >= hi and not to_end:
                    break
        except (OSError, EOFError, zlib.error) as exc:
            raise ShardError(shard.name, f"read error ({exc})") from None
        finally:
            with contextlib.suppress(Exception):  # a pipe closed early exits with SIGPIPE; read errors came first
                stream.close()
        if seen < hi:
            reason = f"ends after {seen} samples, expected {shard.num_samples} (truncated or changed)"
            raise ShardError(shard.name, reason)
        if last is not None:
            yield last

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

    def _worker_batches(self, epoch: int, worker: int, skip: int) -> Iterator[WorkerBatch]:
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
                batch = WorkerBatch(self._encode_chunk(chunk, epoch), notices[:])
                notices.clear()
                yield batch
        finally:
            samples.close()

    # -- iteration ---------------------------------------------------------------------------------------

    def _iter_epoch(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._batch
        if self.cfg.num_workers == 0:
            source: Iterator[WorkerRecord] = self._worker_batches(epoch, 0, start)
        else:
            loader = torch.utils.data.DataLoader(
                _EpochDataset(self, epoch, start), batch_size=None, num_workers=self.cfg.num_workers
            )
            source = iter(loader)
        try:
            for item in source:
                if isinstance(item, WorkerError):
                    raise UserError(item.message)
                self.skipped_shards.extend(item.skipped)
                self._batch += 1
                yield {k: torch.from_numpy(v) for k, v in item.arrays.items()}
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
    of an uninterrupted epoch. Batches travel as `WorkerBatch`, user errors as a `WorkerError` so the main
    process raises a clean UserError (other exceptions take the DataLoader's own route).
    """

    def __init__(self, stream: TrainStream, epoch: int, start: int):
        self.stream, self.epoch, self.start = stream, epoch, start

    def __iter__(self) -> Iterator[WorkerRecord]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        worker = ((info.id if info is not None else 0) + self.start) % workers
        done = len(range(worker, self.start, workers))  # batches of this worker the consumer already has
        try:
            yield from self.stream._worker_batches(self.epoch, worker, done)
        except UserError as exc:
            yield WorkerError(str(exc))

