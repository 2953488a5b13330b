"""Training on pair data end to end (tiny random BERT): a jsonl pair corpus and a text corpus as two weighted
sources, sharded on the fly; per-source counts and masked duplicates reach the metrics (and MLflow); a crash
and `--resume` continue the mixture exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_tiny_encoder_dir, write_corpus
from tests.test_pairs_data import write_pairs
from trainer.config import load_config
from trainer.engine import train


def pair_config(tmp_path: Path, name: str, *extra: str):
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.is_file():
        write_pairs(pairs, num=40)
        # repeated positives, so that in-batch duplicates occur and are masked
        with open(pairs, "a", encoding="utf-8") as fh:
            for i in range(8):
                fh.write(json.dumps({"anchor": f"{i} a city", "positive": "the same river",
                                     "negatives": ["the same river", f"{i} bad day"]}) + "\n")
    corpus = write_corpus(tmp_path / "corpus.txt", num_lines=80)
    sources = f"[{{train: {pairs}, weight: 3, name: nli}}, {{train: {corpus}, weight: 1, name: wiki}}]"
    return load_config(None, [
        f"output_dir={tmp_path / name}",
        f"model.name_or_path={make_tiny_encoder_dir(tmp_path)}",
        "model.max_length=16",
        f"data.sources={sources}",
        "data.batch_size=6",
        "data.shuffle_buffer=0",
        "loss.name=softcse",
        "loss.queue_size=10",
        "optim.lr=1e-3",
        "optim.max_steps=8",
        "eval.sts_dir=",
        "log_every=1",
        "tracking.enabled=false",
        *extra,
    ])


def test_two_sources_train_log_counts_and_resume_exactly(tmp_path):
    reference = train(pair_config(tmp_path, "straight", "checkpoint_every=3"))
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 8
    last = train_rows[-1]
    assert last["data/samples/nli"] + last["data/samples/wiki"] == 8 * 6
    assert last["data/samples/nli"] > 0 and last["data/samples/wiki"] > 0
    assert any(r.get("train/masked_duplicates", 0) > 0 for r in train_rows), "the repeated positives are masked"
    assert (tmp_path / "straight" / "shards" / "nli" / "manifest.json").is_file()

    class Crash(RuntimeError):
        pass

    def crash(step, loss):
        if step == 5:
            raise Crash()

    cfg = pair_config(tmp_path, "crashed", "checkpoint_every=3")
    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    resumed = train(cfg, resume=True)
    assert [s for s, _ in resumed.losses] == [4, 5, 6, 7, 8]
    expected = dict(reference.losses)
    for step, loss in resumed.losses:
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    tail = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {k: tail[k] for k in ("data/samples/nli", "data/samples/wiki")} == {
        k: last[k] for k in ("data/samples/nli", "data/samples/wiki")}
