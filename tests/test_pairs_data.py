"""Pair data and weighted sources: pair shards round-trip (CLI, manifest, skip report, dedup by anchor +
positive, byte-identical re-runs), `PairStream` batches (K hard negatives: drawn per epoch or padded, text
hashes, exact resume), format detection, and `MixedStream` (per-source shares within a binomial bound, exact
resume mid-mixture in both mixing modes, per-source counts)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import WORDS, write_corpus, write_vocab
from trainer.cli import main as cli_main
from trainer.config import ConfigError, DataConfig, SourceConfig, load_config
from trainer.data import (PAD_HASH, MixedStream, PairStream, build_shards, iter_tar_records, make_train_stream,
                          prepare_source, read_manifest, source_format, text_hash)
from trainer.data.pairs import PairFields, decode_pair
from trainer.errors import UserError

BATCH, MAX_LEN, K = 4, 16, 2


def sentence(rng: random.Random, i: int) -> str:
    return f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))


def write_pairs(path: Path, num: int = 27, seed: int = 0, fields=("anchor", "positive", "negatives")) -> list:
    """`num` pairs with 0..3 negatives each (distinct texts); returns them as (anchor, positive, negatives)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(num):
        negs = tuple(sentence(rng, 1000 + 10 * i + j) for j in range(i % 4))
        pairs.append((sentence(rng, i), sentence(rng, 500 + i), negs))
    lines = [json.dumps({fields[0]: a, fields[1]: p, **({fields[2]: list(n)} if n else {})}) for a, p, n in pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = write_vocab(tmp_path_factory.mktemp("tok") / "vocab.txt")
    tokens = vocab.read_text(encoding="utf-8").split("\n")[:-1]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))}, do_lower_case=True)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    pairs = write_pairs(tmp / "pairs.jsonl")
    build_shards([tmp / "pairs.jsonl"], tmp / "shards", shard_size=5, progress=False, format="pairs")
    return tmp / "shards", pairs


def read_back(folder: Path) -> list:
    out = []
    for entry in read_manifest(folder)["shards"]:
        with open(folder / entry["name"], "rb") as fh:
            out += [decode_pair(rec, key, entry["name"]) for key, rec in iter_tar_records(fh, entry["name"])]
    return out


# ----------------------------------------------------------------------------------------------------------
# Pair shards


def test_pair_shards_round_trip_through_the_cli(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "in.jsonl", fields=("q", "a", "hard"))
    extra = [
        json.dumps({"q": pairs[0][0], "a": pairs[0][1], "hard": ["other"]}),  # same anchor + positive: duplicate
        json.dumps({"q": pairs[0][0], "a": "another positive", "hard": "one string", "x": 1}),  # kept
        json.dumps({"q": "no positive"}),  # bad_json
        json.dumps({"q": "  ", "a": "empty anchor"}),  # empty
        "not json",  # bad_json
        json.dumps({"q": "negs", "a": "to drop", "hard": ["", "negs", "to drop", 3, "kept one"]}),  # 4 dropped
    ]
    with open(tmp_path / "in.jsonl", "a", encoding="utf-8") as fh:
        fh.write("\n".join(extra) + "\n")
    argv = ["shard", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--format", "pairs",
            "--anchor-field", "q", "--positive-field", "a", "--negatives-field", "hard", "--shard-size", "7",
            "--dedup", "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 29 pairs in 5 shards" in printed and "4 dropped" in printed

    manifest = read_manifest(tmp_path / "out")
    assert manifest["format"] == "pairs" and manifest["num_samples"] == 29 and manifest["num_lines"] == 33
    assert {k: v for k, v in manifest["skipped"].items() if v} == {"duplicate": 1, "bad_json": 2, "empty": 1}
    assert manifest["max_negatives"] == 3 and manifest["negatives_dropped"] == 4
    assert manifest["num_negatives"] == sum(len(p[2]) for p in pairs) + 2
    want = pairs + [(pairs[0][0], "another positive", ("one string",)), ("negs", "to drop", ("kept one",))]
    assert read_back(tmp_path / "out") == want

    # webdataset's own reader sees the documented members
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False,
                                     empty_check=False).decode()))
    assert (first["anchor.txt"], first["positive.txt"], first["negatives.json"]) == (want[0][0], want[0][1], [])

    # a re-run (and more writer processes) gives the same bytes; a smaller re-run drops the stale shards
    sums = [e["sha256"] for e in manifest["shards"]]
    assert cli_main(argv + ["--workers", "2"]) == 0
    assert [e["sha256"] for e in read_manifest(tmp_path / "out")["shards"]] == sums
    assert cli_main([*argv[:-3], "100", "--dedup", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.tar")) == ["shard-000000.tar"]
    for entry in read_manifest(tmp_path / "out")["shards"]:
        data = (tmp_path / "out" / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]


def test_pair_build_errors(tmp_path):
    write_pairs(tmp_path / "in.jsonl")
    with pytest.raises(UserError, match="--field"):
        build_shards([tmp_path / "in.jsonl"], tmp_path / "o", field="text", format="pairs", progress=False)
    with pytest.raises(UserError, match="pairs only"):
        build_shards([tmp_path / "in.jsonl"], tmp_path / "o", pair_fields=PairFields(), progress=False)
    (tmp_path / "text.txt").write_text("just a sentence\n")
    with pytest.raises(UserError, match="no valid pairs"):
        build_shards([tmp_path / "text.txt"], tmp_path / "o", format="pairs", progress=False)


# ----------------------------------------------------------------------------------------------------------
# PairStream


def pair_stream(folder, tokenizer, tmp_path, *, k=K, seed=7, rank=0, world=1, workers=0) -> PairStream:
    cfg = DataConfig(train=str(folder), batch_size=BATCH, shuffle_buffer=6, num_workers=workers)
    return PairStream(cfg, tokenizer, hard_negatives=k, max_length=MAX_LEN, seed=seed, rank=rank,
                      world_size=world, work_dir=tmp_path / "work")


def test_pair_stream_batches_hold_pairs_k_negatives_and_hashes(pairs_dir, tokenizer, tmp_path):
    folder, pairs = pairs_dir
    by_hash = {text_hash(p[0]): p for p in pairs}
    encode = lambda texts: tokenizer(texts, padding="longest", truncation=True, max_length=MAX_LEN,  # noqa: E731
                                     return_tensors="pt")
    seen = []
    for batch in pair_stream(folder, tokenizer, tmp_path):
        assert batch["input_ids"].shape[0] == BATCH and batch["negative_hash"].shape == (BATCH * K,)
        assert batch["negative_input_ids"].shape[0] == BATCH * K
        for i, h in enumerate(batch["anchor_hash"].tolist()):
            anchor, positive, negatives = by_hash[h]
            seen.append(anchor)
            assert batch["positive_hash"][i].item() == text_hash(positive)
            got = batch["negative_hash"][i * K:(i + 1) * K].tolist()
            real = [x for x in got if x != PAD_HASH]
            assert len(real) == min(K, len(negatives)) and set(real) <= {text_hash(n) for n in negatives}
            row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            assert torch.equal(row, encode([anchor])["input_ids"][0])
            pad_row = batch["negative_input_ids"][i * K + K - 1]
            if got[-1] == PAD_HASH:  # an empty slot is the empty text: [CLS] [SEP]
                assert pad_row[batch["negative_attention_mask"][i * K + K - 1].bool()].tolist() == [
                    tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert len(seen) == len(set(seen)) == (len(pairs) // BATCH) * BATCH


def test_negatives_are_redrawn_each_epoch_reproducibly(pairs_dir, tokenizer, tmp_path):
    folder, pairs = pairs_dir

    def draws(seed):
        stream = pair_stream(folder, tokenizer, tmp_path, seed=seed)
        out = []
        for _ in range(3):
            out.append({b_a: tuple(b_n) for batch in stream
                        for b_a, b_n in zip(batch["anchor_hash"].tolist(), batch["negative_hash"].view(-1, K).tolist())})
        return out

    first, again = draws(7), draws(7)
    assert first == again
    three = [h for h, p in ((text_hash(p[0]), p) for p in pairs) if len(p[2]) == 3]
    picks = {tuple(sorted(epoch[h])) for epoch in first for h in three if h in epoch}
    assert len(picks) > 1, "pairs with more than K negatives should not always keep the same K"


def test_pair_stream_resume_mid_epoch_continues_exactly(pairs_dir, tokenizer, tmp_path):
    folder, _ = pairs_dir
    whole = pair_stream(folder, tokenizer, tmp_path)
    straight = list(whole) + list(whole)  # two epochs
    first = pair_stream(folder, tokenizer, tmp_path)
    head = list(itertools.islice(iter(first), 4))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["format"] == "pairs" and state["hard_negatives"] == K
    resumed = pair_stream(folder, tokenizer, tmp_path)
    resumed.load_state_dict(state)
    rest = list(iter(resumed)) + list(iter(resumed))
    assert len(rest) == len(straight) - len(head)
    for want, got in zip(straight[4:], rest):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_zero_hard_negatives_reads_no_negative_keys(pairs_dir, tokenizer, tmp_path):
    folder, _ = pairs_dir
    batch = next(iter(pair_stream(folder, tokenizer, tmp_path, k=0)))
    assert "negative_hash" not in batch and "negative_input_ids" not in batch and "positive_hash" in batch


# ----------------------------------------------------------------------------------------------------------
# Formats


def test_format_detection_and_refusals(pairs_dir, tmp_path):
    folder, pairs = pairs_dir
    assert source_format(str(folder)) == ("pairs", 3)
    assert source_format(str(folder / "shard-*.tar")) == ("pairs", 3)
    text = tmp_path / "text"
    build_shards([write_corpus(tmp_path / "c.txt", 20)], text, progress=False)
    assert source_format(str(text)) == ("text", None)
    with pytest.raises(UserError, match="hold pairs"):
        source_format(str(folder), "text")
    # a jsonl corpus whose first line is a pair is sharded as pairs (auto), a plain one as text
    write_pairs(tmp_path / "p.jsonl", num=9)
    out = prepare_source(str(tmp_path / "p.jsonl"), tmp_path / "s1", tmp_path, shard_size=4)
    assert read_manifest(out)["format"] == "pairs"
    out = prepare_source(str(tmp_path / "c.txt"), tmp_path / "s2", tmp_path, shard_size=4)
    assert read_manifest(out)["format"] == "webdataset"
    with pytest.raises(ConfigError, match="iftcl"):
        load_config(None, ["data.format=pairs", "loss.name=iftcl", "data.train=x"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["data.train=x", "data.sources=[{train: y}]"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, ["data.sources=[{train: a/x.txt}, {train: b/x.jsonl}]"])


def test_iftcl_on_pair_data_is_refused(pairs_dir, tokenizer, tmp_path):
    folder, _ = pairs_dir
    cfg = DataConfig(train=str(folder), batch_size=BATCH)
    with pytest.raises(UserError, match="iftcl"):
        make_train_stream(cfg, tokenizer, max_length=MAX_LEN, seed=0, rank=0, world_size=1, work_dir=tmp_path,
                          fraternal=lambda text, rng: text)


# ----------------------------------------------------------------------------------------------------------
# Weighted sources


class CountingStream:
    """A stand-in source: batch n holds rows n*B .. n*B+B-1 tagged with the source id; resumable."""

    def __init__(self, tag: int, batch: int = BATCH):
        self.tag, self.batch, self.pos = tag, batch, 0

    def __iter__(self):
        while True:
            rows = torch.arange(self.pos * self.batch, (self.pos + 1) * self.batch)
            self.pos += 1
            yield {"input_ids": torch.stack([torch.full_like(rows, self.tag), rows], 1),
                   "attention_mask": torch.ones(self.batch, 2, dtype=torch.long)}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]

    def batches_per_epoch(self):
        return 10


@pytest.mark.parametrize("mode, num_batches", [("batch", 3000), ("sample", 400)])
def test_per_source_shares_match_the_weights_within_a_binomial_bound(mode, num_batches):
    weights = [5.0, 3.0, 2.0]
    mix = MixedStream([(f"s{i}", w, CountingStream(i)) for i, w in enumerate(weights)], mode=mode, seed=11,
                      batch_size=BATCH)
    tags = torch.cat([b["input_ids"][:, 0] for b in itertools.islice(mix, num_batches)])
    draws = num_batches if mode == "batch" else num_batches * BATCH  # independent draws: batches or rows
    for i, w in enumerate(weights):
        p = w / sum(weights)
        share = (tags == i).float().mean().item()
        assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / draws), (i, share, p)
        assert mix.counts[f"s{i}"] == (tags == i).sum().item()
    assert mix.metrics() == {f"data/samples/s{i}": float(mix.counts[f"s{i}"]) for i in range(3)}
    if mode == "batch":  # one source per batch
        assert all(len(set(b["input_ids"][:, 0].tolist())) == 1 for b in itertools.islice(mix, 50))


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_resume_mid_mixture_continues_exactly_with_stand_ins(mode):
    def mixture():
        return MixedStream([("a", 2.0, CountingStream(0, 4)), ("b", 1.0, CountingStream(1, 4))], mode=mode, seed=3,
                           batch_size=3)  # 3 rows from batches of 4: sample mode keeps partly used batches

    whole = mixture()
    straight = [b["input_ids"] for b in itertools.islice(whole, 40)]
    first = mixture()
    list(itertools.islice(first, 17))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = mixture()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in itertools.islice(resumed, 23)]
    assert all(torch.equal(x, y) for x, y in zip(straight[17:], rest))
    assert resumed.counts == whole.counts and resumed.drawn == whole.drawn == 40


def mixed_config(tmp_path, mode, sources) -> DataConfig:
    return DataConfig(sources=[SourceConfig(**s) for s in sources], batch_size=BATCH, shuffle_buffer=6,
                      source_mixing=mode)


def test_resume_mid_mixture_of_real_sources_continues_exactly(pairs_dir, tokenizer, tmp_path):
    """A pair source and a text corpus (sharded on the fly per source), batch mixing, 2 ranks' rank 1."""
    folder, _ = pairs_dir
    corpus = write_corpus(tmp_path / "corpus.txt", 40)
    cfg = mixed_config(tmp_path, "batch", [dict(train=str(folder), weight=2.0, name="pairs"),
                                           dict(train=str(corpus), name="text")])

    def make():
        return make_train_stream(cfg, tokenizer, max_length=MAX_LEN, seed=5, rank=1, world_size=2,
                                 work_dir=tmp_path / "work")

    straight = list(itertools.islice(make(), 30))
    assert (tmp_path / "work" / "shards" / "text" / "manifest.json").is_file()
    assert {("positive_hash" in b) for b in straight} == {True, False}, "both kinds of batch are drawn"
    first = make()
    list(itertools.islice(first, 13))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for want, got in zip(straight[13:], itertools.islice(resumed, 17)):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert sum(resumed.counts.values()) == 30 * BATCH * 2  # over both ranks


def test_sample_mixing_of_pair_sources_pads_rows_and_resumes(pairs_dir, tokenizer, tmp_path):
    folder, _ = pairs_dir
    other = tmp_path / "more.jsonl"
    write_pairs(other, num=13, seed=9)
    cfg = mixed_config(tmp_path, "sample", [dict(train=str(folder), name="a"), dict(train=str(other), name="b")])

    def make():
        return make_train_stream(cfg, tokenizer, max_length=MAX_LEN, seed=5, rank=0, world_size=1,
                                 work_dir=tmp_path / "work")

    straight = list(itertools.islice(make(), 25))
    assert all(b["negative_hash"].shape == (BATCH * 3,) for b in straight), "one K (the largest) for all sources"
    first = make()
    list(itertools.islice(first, 9))
    state = json.loads(json.dumps(first.state_dict()))
    assert any(state["used"].values()), "the test should stop inside a partly used batch"
    resumed = make()
    resumed.load_state_dict(state)
    for want, got in zip(straight[9:], itertools.islice(resumed, 16)):
        assert all(torch.equal(want[k], got[k]) for k in want)
    text = write_corpus(tmp_path / "c.txt", 30)
    bad = mixed_config(tmp_path, "sample", [dict(train=str(folder), name="a"), dict(train=str(text), name="t")])
    with pytest.raises(UserError, match="source_mixing=sample"):
        make_train_stream(bad, tokenizer, max_length=MAX_LEN, seed=5, rank=0, world_size=1, work_dir=tmp_path)


def test_resume_refuses_changed_sources(pairs_dir, tokenizer, tmp_path):
    folder, _ = pairs_dir
    mix = MixedStream([("a", 1.0, CountingStream(0))], batch_size=BATCH)
    with pytest.raises(UserError, match="data.sources changed"):
        mix.load_state_dict({"kind": "mixture", "sources": {"b": {}}, "drawn": 0, "counts": {}})
    with pytest.raises(UserError, match="not a data.sources mixture"):
        mix.load_state_dict({"epoch": 0, "batch": 3})


def test_make_pairs_script_builds_sts_and_nli_pairs(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    folder = tmp_path / "sts" / "STSBenchmark"
    folder.mkdir(parents=True)
    rows = [("a man plays a guitar .", "a man is playing guitar .", 4.6),
            ("a man plays a guitar .", "a dog runs .", 0.4),
            ("a woman cuts an onion .", "a woman is slicing an onion .", 4.2),
            ("a woman cuts bread .", "a cat sleeps .", 0.8),
            ("a girl sings .", "a man eats .", 2.5)]
    (folder / "sts-train.csv").write_text("".join(f"g\tMSRvid\t2012\t{i:04d}\t{s}\t{a}\t{b}\n"
                                                  for i, (a, b, s) in enumerate(rows)))
    out = tmp_path / "sts.jsonl"
    subprocess.run([sys.executable, str(root / "data" / "make_pairs.py"), "sts", "--sts-dir", str(tmp_path / "sts"),
                    "--output", str(out)], check=True, capture_output=True)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    # own low-score partner first, then the partner of the low-score look-alike ("a woman cuts bread .")
    assert got == [{"anchor": rows[0][0], "positive": rows[0][1], "negatives": ["a dog runs .", "a cat sleeps ."]},
                   {"anchor": rows[2][0], "positive": rows[2][1], "negatives": ["a cat sleeps ."]}]
    (tmp_path / "nli.csv").write_text('sent0,sent1,hard_neg\n"p, one",h1,c1\np2,h2,c2\n')
    subprocess.run([sys.executable, str(root / "data" / "make_pairs.py"), "nli", "--input", str(tmp_path / "nli.csv"),
                    "--output", str(tmp_path / "nli.jsonl")], check=True, capture_output=True)
    assert json.loads((tmp_path / "nli.jsonl").read_text().splitlines()[0]) == {
        "anchor": "p, one", "positive": "h1", "negatives": ["c1"]}
