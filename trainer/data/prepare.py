"""Training sources made ready for the stream: a text / .gz / jsonl corpus named as a source is sharded here
(`trainer.data.build.build_shards`), once, before any stream is built: the stream only reads shards. A build is
reused while its inputs (paths, sizes, mtimes) and options are unchanged; ranks sharing a work_dir serialise
on a lock, so one builds and the others reuse its shards. What the build skipped is logged where the user looks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainer.config import DataConfig
from trainer.data.build import DEFAULT_MAX_CHARS, build_shards, manifest_matches, skip_summary
from trainer.data.pairs import PAIRS_FORMAT, PairFields, sniff_pairs
from trainer.data.shard_format import read_manifest
from trainer.data.sources import parse_source, work_dir_lock

log = logging.getLogger(__name__)


def prepare_train_source(data_cfg: DataConfig, work_dir: str | Path, *, progress: bool = False) -> str:
    """The spec the training stream reads for `data_cfg.train`: the spec itself, unless it names a text / .gz /
    jsonl corpus; then the corpus is sharded into `<work_dir>/shards` and that folder is returned.

    The build is reused while the input files (paths, sizes, mtimes) and `data_cfg.shard_size` are unchanged.
    Ranks sharing `work_dir` serialise on a lock, so one builds and the others reuse its shards. Call it before
    building the `TrainStream`, which only reads shards."""
    return prepare_source(data_cfg.train, Path(work_dir) / "shards", work_dir, shard_size=data_cfg.shard_size,
                          format=data_cfg.format, progress=progress)


def prepare_source(spec: str, out: str | Path, work_dir: str | Path, *, shard_size: int, format: str = "auto",
                   progress: bool = False) -> str:
    """`prepare_train_source` for one spec: a corpus is sharded into `out` (reused while unchanged), anything
    else returned as is. A jsonl corpus is sharded as pairs with `format="pairs"`, or with `format="auto"`
    when its first line is a pair (`sniff_pairs`); pair fields are the default names."""
    source = parse_source(spec)
    if source.kind != "corpus":
        return spec
    work_dir, out = Path(work_dir), Path(out)
    inputs = [Path(p) for p in source.items]
    options: dict[str, Any] = dict(shard_size=shard_size, field=None, dedup=False, min_chars=1,
                                   max_chars=DEFAULT_MAX_CHARS)
    build_options: dict[str, Any] = {}
    if format == PAIRS_FORMAT or (format == "auto" and sniff_pairs(inputs[0])):
        fields = PairFields()
        options.update(format=PAIRS_FORMAT, fields=[fields.anchor, fields.positive, fields.negatives])
        build_options = dict(format=PAIRS_FORMAT, pair_fields=fields)
    base = {k: v for k, v in options.items() if k not in ("format", "fields")}
    with work_dir_lock(work_dir):
        if manifest_matches(out, inputs, **options):
            manifest = read_manifest(out)
            what = f"reusing shards in {out} (inputs unchanged)"
        else:
            log.info("sharding %s into %s", ", ".join(map(str, inputs)), out)
            manifest = build_shards(inputs, out, progress=progress, **base, **build_options)
            what = f"sharded into {out}"
    # Skipped lines are counted in the manifest; say so where the user looks, with where the first ones are.
    level = logging.WARNING if any(manifest["skipped"].values()) else logging.INFO
    log.log(level, "%s: %d %s from %d lines; skipped: %s", what, manifest["num_samples"],
            "pairs" if build_options else "sentences", manifest["num_lines"], skip_summary(manifest))
    return str(out)
