"""Issue 12 (trust), data and evaluation: no shell injection through manifests, every truncation detected,
`data.verify: sha256`, manifests that under-count, visible skip summaries, one-line STS errors."""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import WORDS, make_tiny_encoder_dir, write_stsb_dev
from tests.test_data import NUM, epoch_rows, make
from tests.test_data import corpus, lookup, shard_dir, tokenizer  # noqa: F401 (fixtures)
from trainer.config import DataConfig
from trainer.data import ShardError, build_shards, iter_tar_samples, prepare_train_source, tar_bytes
from trainer.errors import UserError
from trainer.evaluate import evaluate_sts


def _copy(shard_dir: Path, tmp_path: Path, name: str, *, manifest: bool = True) -> Path:
    copy = tmp_path / name
    shutil.copytree(shard_dir, copy)
    if not manifest:
        (copy / "manifest.json").unlink()
    return copy


def _edit_manifest(folder: Path, index: int, **fields) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][index].update(fields)
    path.write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------------------------------------
# Security 2: shard names from a manifest never reach a shell


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["x.tar; touch {marker}", "$(touch {marker})", "`touch {marker}`",
                                  "x.tar | touch {marker}", "../shards/shard-000000.tar", ".."])
@pytest.mark.parametrize("via", ["pipe", "folder"])
def test_manifest_shard_names_never_reach_a_shell(shard_dir, tokenizer, tmp_path, name, via):
    marker = tmp_path / "MARKER"
    copy = _copy(shard_dir, tmp_path, "shards")
    bad = name.format(marker=marker)
    _edit_manifest(copy, 3, name=bad)
    spec = f"pipe:cat {copy}/manifest.json" if via == "pipe" else str(copy)
    with pytest.raises(UserError) as caught:
        list(make(spec, tokenizer, tmp_path))  # old code: built fine, and reading ran the command
    assert not marker.exists()
    message = str(caught.value)
    assert "\n" not in message and "manifest.json" in message and "not a plain file name" in message
    assert repr(bad) in message


def test_shard_urls_from_a_manifest_are_shell_quoted(shard_dir, tmp_path):
    from trainer.data.sources import resolve_shards

    shards, _ = resolve_shards(f"pipe:cat '{shard_dir}/manifest.json'", work_dir=tmp_path / "w")
    assert shards[0].url == f"pipe:cat '{shard_dir}/shard-000000.tar'"  # safe names quote to themselves


# ----------------------------------------------------------------------------------------------------------
# 4: every truncation of a shard is detected, whatever the source


def _hundred_sample_shard() -> bytes:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 150))) for _ in range(100)]
    return tar_bytes((f"{i:010d}", t) for i, t in enumerate(texts))


def test_every_cut_point_of_a_shard_is_detected():
    data = _hundred_sample_shard()
    assert len(list(iter_tar_samples(io.BytesIO(data), "full.tar"))) == 100
    end_marker = data.rstrip(b"\0")  # the last member's data; its padding, the end marker and the record follow
    marker_end = len(end_marker) + (-len(end_marker) % 512) + 1024
    rng = random.Random(1)
    cuts = set(rng.sample(range(1, len(data)), 1500))
    cuts |= set(range(len(end_marker) - 700, marker_end + 600))  # last member, its padding, the end marker
    cuts |= set(range(512, len(data), 512))  # every block boundary: no end marker after a complete member
    passed = []
    for cut in sorted(cuts):
        try:
            samples = list(iter_tar_samples(io.BytesIO(data[:cut]), "cut.tar"))
        except ShardError as exc:
            assert "truncated" in exc.reason, (cut, exc.reason)
            continue
        passed.append(cut)
        assert len(samples) == 100  # only cuts that lose no sample at all may pass
    # The only readable cuts: block-aligned ones in the zero padding after the complete end-of-archive marker
    # (GNU tar pads to 10 KiB records; Go's archive/tar writes no padding at all).
    assert all(cut >= marker_end and cut % 512 == 0 for cut in passed), passed[:5]
    assert len(cuts) - len(passed) > 2000
    assert list(iter_tar_samples(io.BytesIO(b""), "zero.tar")) == []  # no archive at all: an "empty" shard


def _cut(path: Path, cut: int) -> None:
    path.write_bytes(path.read_bytes()[:cut])


# member 4 of a 10-sample shard: header at 4096, data at 4608 (< 100 bytes, so byte 200 is block padding)
CUTS = {"in member padding": 4608 + 200, "at a member boundary": 4096, "inside the end marker": 10 * 1024 + 512,
        "no end marker": 10 * 1024, "inside a header": 4096 + 100}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["folder", "glob", "pipe-url", "brace-url"])
def test_truncated_shard_without_manifest_is_detected_in_every_source(shard_dir, tokenizer, tmp_path, kind):
    for i, (where, cut) in enumerate(CUTS.items()):
        copy = _copy(shard_dir, tmp_path, f"{kind}-{i}", manifest=False)
        _cut(copy / "shard-000003.tar", cut)
        spec = {"folder": str(copy), "glob": f"{copy}/*.tar",
                "pipe-url": f"pipe:cat {copy}/shard-{{000000..000010}}.tar",
                "brace-url": f"file:{copy}/shard-{{000000..000010}}.tar"}[kind]
        with pytest.raises(UserError, match="shard-000003.tar.*truncated"):
            make(spec, tokenizer, tmp_path / f"w{i}")  # a fresh count cache for every cut
        stream = make(spec, tokenizer, tmp_path / f"w{i}", on_error="skip")
        assert stream.num_samples == NUM - 10, where
        assert [s["shard"].endswith("shard-000003.tar") for s in stream.skipped_shards] == [True]


def test_counts_cached_by_an_older_reader_are_not_trusted(shard_dir, tokenizer, tmp_path):
    copy = _copy(shard_dir, tmp_path, "cached", manifest=False)
    _cut(copy / "shard-000003.tar", CUTS["in member padding"])
    work = tmp_path / "work"
    work.mkdir()
    st = (copy / "shard-000003.tar").stat()
    # what the old reader cached for this truncated shard: 5 samples, accepted
    (work / "shard_counts.json").write_text(json.dumps({f"{copy}/shard-000003.tar:{st.st_size}:{st.st_mtime_ns}": 5}))
    with pytest.raises(UserError, match="shard-000003.tar.*truncated"):
        make(copy, tokenizer, tmp_path)


def test_truncated_gzip_shard_is_detected(shard_dir, tokenizer, tmp_path):
    import gzip

    copy = _copy(shard_dir, tmp_path, "gz", manifest=False)
    for tar in copy.glob("*.tar"):
        (copy / (tar.name + ".gz")).write_bytes(gzip.compress(tar.read_bytes()))
        tar.unlink()
    _cut(copy / "shard-000003.tar.gz", 200)
    with pytest.raises(UserError, match="shard-000003.tar.gz"):
        make(f"{copy}/*.tar.gz", tokenizer, tmp_path)


# ----------------------------------------------------------------------------------------------------------
# 5: data.verify = sha256


def _garble_member(path: Path, member: int = 3) -> None:
    """Overwrite one member's text with garbage of the same length: size and tar structure stay valid."""
    data = bytearray(path.read_bytes())
    start = member * 1024 + 512
    size = int(data[member * 1024 + 124 : member * 1024 + 135], 8)
    data[start : start + size] = b"#" * size
    path.write_bytes(bytes(data))


def test_verify_field_is_checked():
    assert DataConfig().verify == "size"
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="data.verify"):
        DataConfig(verify="md5")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", ["{dir}", "{dir}/shard-*.tar", "pipe:cat {dir}/manifest.json"])
def test_same_size_garbage_is_caught_by_verify_sha256(shard_dir, tokenizer, lookup, tmp_path, spec):
    copy = _copy(shard_dir, tmp_path, "garbled")
    _garble_member(copy / "shard-000003.tar")
    spec = spec.format(dir=copy)
    assert make(spec, tokenizer, tmp_path).num_samples == NUM  # size: the default, cheap, does not see it
    with pytest.raises(UserError, match="shard-000003.tar.*sha256"):
        make(spec, tokenizer, tmp_path, verify="sha256")
    stream = make(spec, tokenizer, tmp_path, verify="sha256", on_error="skip")
    assert stream.num_samples == NUM - 10
    got = [i for b in epoch_rows(stream, lookup) for i in b]  # every row is a real corpus line
    assert not set(got) & set(range(30, 40))


@pytest.mark.timeout(60)
def test_sha256_is_verified_once_per_shard_per_process(shard_dir, tokenizer, tmp_path, monkeypatch):
    import trainer.data.verify as verify

    verify.clear_cache()
    calls: list[str] = []
    real = verify._sha256

    def counting(url: str, local: bool) -> str:
        calls.append(url)
        return real(url, local)

    monkeypatch.setattr(verify, "_sha256", counting)
    copy = _copy(shard_dir, tmp_path, "cache")
    stream = make(copy, tokenizer, tmp_path, verify="sha256")
    assert len(calls) == 11
    list(stream)
    make(copy, tokenizer, tmp_path, verify="sha256")
    assert len(calls) == 11  # the same files again: cached by path, size and mtime
    # Replaced after the stream was built (same size): verified again when next opened, and refused.
    _garble_member(copy / "shard-000003.tar")
    with pytest.raises(UserError, match="shard-000003.tar.*sha256"):
        list(stream)
    assert calls[11:] == [str(copy / "shard-000003.tar")]


def test_verify_sha256_without_checksums_says_so(shard_dir, tokenizer, tmp_path, caplog):
    copy = _copy(shard_dir, tmp_path, "bare", manifest=False)
    with caplog.at_level(logging.WARNING):
        make(copy, tokenizer, tmp_path, verify="sha256")
    assert "11 shards have no sha256" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# 6: a manifest that claims fewer samples than a shard holds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_manifest_undercount_is_an_error(shard_dir, tokenizer, tmp_path, workers):
    copy = _copy(shard_dir, tmp_path, "undercount")
    _edit_manifest(copy, 3, num_samples=6)  # bytes and sha256 still match: only reading finds it
    stream = make(copy, tokenizer, tmp_path, workers=workers)
    with pytest.raises(UserError, match="shard-000003.tar: holds more than the 6 samples manifest.json lists"):
        list(stream)
    stream = make(copy, tokenizer, tmp_path, workers=workers, on_error="skip")
    list(stream)
    assert [s["shard"] for s in stream.skipped_shards] == [str(copy / "shard-000003.tar")]


# ----------------------------------------------------------------------------------------------------------
# Skip summary of sharding


def test_on_the_fly_sharding_shows_its_skip_summary(tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"one sentence\n\nbad \xff utf8\ntwo sentence\n   \n")
    with caplog.at_level(logging.INFO, logger="trainer.data.build"):
        prepare_train_source(DataConfig(train=str(corpus)), tmp_path / "work")
    line = next(r for r in caplog.records if "skipped" in r.getMessage())
    assert line.levelno == logging.WARNING
    text = line.getMessage()
    assert "2 sentences" in text and "5 lines" in text
    assert f"empty=2 (first: {corpus}:2)" in text and f"invalid_utf8=1 (first: {corpus}:3)" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.data.build"):
        prepare_train_source(DataConfig(train=str(corpus)), tmp_path / "work")  # reused: said again
    assert "empty=2" in caplog.text and "reusing" in caplog.text


def test_cli_shard_prints_where_lines_were_skipped(tmp_path, capsys):
    from trainer.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("a sentence\n\nanother sentence\n")
    assert main(["shard", "--input", str(corpus), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert f"skipped: empty=1 (first: {corpus}:2)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"]["empty"] == 1 and manifest["skipped_first"] == {"empty": f"{corpus}:2"}


# ----------------------------------------------------------------------------------------------------------
# STS files: one line naming the file and line; constant gold scores


class _Lengths:
    def encode(self, sentences, batch_size=128):
        return torch.nn.functional.normalize(torch.tensor([[len(s), s.count("e") + 1.0] for s in sentences]), dim=1)


def _stsb_with(tmp_path: Path, lineno: int, line: str) -> Path:
    sts = write_stsb_dev(tmp_path / "sts", num_pairs=10)
    path = sts / "STSBenchmark" / "sts-dev.csv"
    lines = path.read_text().splitlines()
    lines[lineno - 1] = line
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, problem", [
    ("g\tMSRvid\t2012\t0001\tfive\tA man runs.\tA man walks.", "score 'five' is not a number"),
    ("g\tMSRvid\t2012\t0001\t3.0\tA man runs.", "7 tab-separated columns"),
    ("g\tMSRvid\t2012\t0001\tnan\tA man runs.\tA man walks.", "score 'nan' is not a number"),
])
def test_malformed_stsb_is_one_line_naming_file_and_line(tmp_path, line, problem):
    path = _stsb_with(tmp_path, 4, line)
    with pytest.raises(UserError) as caught:
        evaluate_sts(_Lengths(), path.parents[1], tasks=["stsb_dev"], progress=False)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: ") and problem in message and "\n" not in message


def test_malformed_senteval_and_sick_files(tmp_path):
    folder = tmp_path / "STS12-en-test"
    folder.mkdir()
    (folder / "STS.input.a.txt").write_text("a b\tc d\ne f\tg h\nno tab here\n")
    (folder / "STS.gs.a.txt").write_text("1.0\n2.0\n3.0\n")
    with pytest.raises(UserError, match=r"STS.input.a.txt:3: expected 2 tab-separated sentences"):
        evaluate_sts(_Lengths(), tmp_path, tasks=["sts12"], progress=False)
    (folder / "STS.input.a.txt").write_text("a b\tc d\ne f\tg h\n")
    (folder / "STS.gs.a.txt").write_text("1.0\nhigh\n")
    with pytest.raises(UserError, match=r"STS.gs.a.txt:2: score 'high' is not a number"):
        evaluate_sts(_Lengths(), tmp_path, tasks=["sts12"], progress=False)
    (folder / "STS.gs.a.txt").write_text("1.0\n2.0\n4.0\n")
    with pytest.raises(UserError, match=r"STS.gs.a.txt has 3 lines but STS.input.a.txt has 2"):
        evaluate_sts(_Lengths(), tmp_path, tasks=["sts12"], progress=False)
    sick = tmp_path / "SICK"
    sick.mkdir()
    (sick / "SICK_trial.txt").write_text("pair_ID\tsentence_A\tsentence_B\tentailment\n1\ta\tb\tNEUTRAL\n")
    with pytest.raises(UserError, match=r"SICK_trial.txt:1: no 'relatedness_score' column"):
        evaluate_sts(_Lengths(), tmp_path, tasks=["sickr_trial"], progress=False)
    (sick / "SICK_trial.txt").write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\n1\ta\tb\t4.5\n2\tc\n")
    with pytest.raises(UserError, match=r"SICK_trial.txt:3: expected at least 4 tab-separated columns"):
        evaluate_sts(_Lengths(), tmp_path, tasks=["sickr_trial"], progress=False)


def test_missing_stsbenchmark_is_an_error_when_nothing_is_found(tmp_path):
    (tmp_path / "sts").mkdir()
    with pytest.raises(UserError, match=r"stsb_dev: .*STSBenchmark/sts-dev.csv"):
        evaluate_sts(_Lengths(), tmp_path / "sts", tasks=["stsb_dev"], progress=False)  # old code: {}


def test_constant_gold_scores_are_an_error(tmp_path):
    sts = write_stsb_dev(tmp_path / "sts", num_pairs=10)
    path = sts / "STSBenchmark" / "sts-dev.csv"
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    path.write_text("".join("\t".join(r[:4] + ["3.000"] + r[5:]) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"sts-dev.csv: all 10 gold scores are 3.0.*Spearman"):
        evaluate_sts(_Lengths(), sts, tasks=["stsb_dev"], progress=False)  # old code: nan


def test_cli_evaluate_malformed_file_is_one_error_line(tmp_path, capsys):
    from trainer.cli import main
    from trainer.model import SentenceEncoder

    SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="mean").save(tmp_path / "ckpt" / "model")
    path = _stsb_with(tmp_path, 2, "g\tMSRvid\t2012\t0001\tx\ty\tz")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "ckpt"), "--sts-dir", str(path.parents[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}:2: score 'x' is not a number"]


def test_real_sts_files_still_parse():
    sts = Path(__file__).resolve().parents[1] / "data" / "sts"
    results = evaluate_sts(_Lengths(), sts, tasks=["stsb_dev"], progress=False)
    assert np.isfinite(results["stsb_dev"])
