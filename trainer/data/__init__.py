"""Training data: corpus -> webdataset shards -> exact, resumable, rank- and worker-split token batches.

Modules, from the bottom up (each imports only the ones above it):

- `shard_format`: the tar format of a shard (writer, streaming reader) and manifest.json.
- `verify`: `data.verify: sha256`, a shard's bytes against its manifest checksum, once per process.
- `sources`: what `data.train` names (folder, .tar glob, URLs, manifest URL, text corpus), resolved to shards
  with sample counts, the bad-shard policy at build time, and the work-dir lock.
- `build`: text / .gz / jsonl corpus -> shards (`build_shards`); `prepare`: `prepare_train_source`, which shards a
  corpus named by `data.train` before the stream is built.
- `tokenize`: exact, fast batch encoders (`make_batch_encoder`).
- `augment`: the fraternal twin (token-level edits) of IFTCL.
- `stream`: `TrainStream`, the epoch plan, the rank and worker split, resume, DataLoader plumbing.
- `pairs`: pair samples (anchor, positive, hard negatives): jsonl cleaning, tar layout, text hashes.
- `pair_stream`: `PairStream`, the `TrainStream` of pair shards (K hard negatives per pair).
- `mixture`: `data.sources` (`MixedStream`, weighted, exactly resumable) and `make_train_stream`, the
  engine's one call (shards a corpus, reads each source's format, builds the right stream).
"""

from trainer.data.augment import FraternalAugmenter, make_fraternal
from trainer.data.build import (
    DEFAULT_MAX_CHARS,
    DEFAULT_SHARD_SIZE,
    SKIP_REASONS,
    build_shards,
    manifest_matches,
    skip_summary,
)
from trainer.data.prepare import prepare_source, prepare_train_source
from trainer.data.mixture import MixedStream, data_metrics, make_train_stream, source_format
from trainer.data.pair_stream import PairStream
from trainer.data.pairs import PAD_HASH, PAIRS_FORMAT, PairFields, text_hash
from trainer.data.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_NAME,
    ShardError,
    count_samples,
    iter_tar_samples,
    open_shard,
    parse_manifest,
    read_manifest,
    sample_key,
    iter_tar_records,
    tar_archive,
    tar_bytes,
)
from trainer.data.sources import Shard, Source, expand_inputs, parse_source, resolve_shards
from trainer.data.stream import TrainStream, WorkerBatch, WorkerError
from trainer.data.tokenize import make_batch_encoder

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DEFAULT_SHARD_SIZE",
    "FORMAT_VERSION",
    "MANIFEST",
    "PAD_HASH",
    "PAIRS_FORMAT",
    "SHARD_NAME",
    "SKIP_REASONS",
    "FraternalAugmenter",
    "MixedStream",
    "PairFields",
    "PairStream",
    "Shard",
    "ShardError",
    "Source",
    "TrainStream",
    "WorkerBatch",
    "WorkerError",
    "build_shards",
    "count_samples",
    "data_metrics",
    "expand_inputs",
    "iter_tar_records",
    "iter_tar_samples",
    "make_batch_encoder",
    "make_fraternal",
    "make_train_stream",
    "manifest_matches",
    "open_shard",
    "parse_manifest",
    "parse_source",
    "prepare_source",
    "prepare_train_source",
    "read_manifest",
    "resolve_shards",
    "sample_key",
    "skip_summary",
    "source_format",
    "tar_archive",
    "tar_bytes",
    "text_hash",
]
