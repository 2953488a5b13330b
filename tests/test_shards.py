"""Shard builder: round trips (text, gz, jsonl, globs), skip accounting, dedup, determinism across worker
counts, manifest checksums, crash safety and user errors; the tar reader on archives from other writers."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

import trainer.data.build as build_module
from trainer.data import ShardError, build_shards, iter_tar_samples, read_manifest, tar_bytes
from trainer.errors import UserError


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _read_all(folder: Path) -> list[tuple[str, str]]:
    """(key, text) of every sample, in manifest order, read with our reader."""
    out = []
    for entry in read_manifest(folder)["shards"]:
        with open(folder / entry["name"], "rb") as fh:
            out += [(k, v.decode("utf-8")) for k, v in iter_tar_samples(fh, entry["name"])]
    return out


def _sentences(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i} the city of music and light" for i in range(n)]


def test_text_round_trip_manifest_and_readers(tmp_path):
    lines = _sentences(30)
    manifest = build_shards([_write(tmp_path / "c.txt", lines)], tmp_path / "out", shard_size=7, progress=False)
    assert manifest["num_samples"] == 30 and manifest["num_shards"] == 5 and manifest["num_lines"] == 30
    assert [e["num_samples"] for e in manifest["shards"]] == [7, 7, 7, 7, 2]
    assert [e["name"] for e in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert read_manifest(tmp_path / "out") == manifest
    for entry in manifest["shards"]:
        data = (tmp_path / "out" / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    samples = _read_all(tmp_path / "out")
    assert [t for _, t in samples] == lines
    assert [k for k, _ in samples] == [f"{i:010d}" for i in range(30)]
    # The standard library and webdataset read the same archives.
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"{i:010d}.txt" for i in range(7, 14)]
        assert tf.extractfile(members[0]).read().decode() == lines[7]
    import webdataset as wds

    ds = wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False, empty_check=False)
    first = next(iter(ds))
    assert first["__key__"] == "0000000000" and first["txt"].decode() == lines[0]


def test_gz_jsonl_and_glob_of_many_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    expected = []
    for i in range(12):  # a glob of many files, read in sorted order
        expected += _write(src / f"part-{i:02d}.txt", _sentences(3, f"p{i}-")).read_text().splitlines()
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("gz one\ngz two\n")
    rows = [{"text": "json one", "id": 1}, {"text": "json two"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "gz json"}) + "\n")
    inputs = [str(src / "part-*.txt"), tmp_path / "b.txt.gz", tmp_path / "c.jsonl", tmp_path / "d.jsonl.gz"]
    manifest = build_shards(inputs, tmp_path / "out", shard_size=10, progress=False)
    texts = [t for _, t in _read_all(tmp_path / "out")]
    assert texts == expected + ["gz one", "gz two", "json one", "json two", "gz json"]
    assert len(manifest["inputs"]) == 15 and manifest["num_samples"] == 41

    # --field reads every input as JSON lines, whatever its name.
    (tmp_path / "e.txt").write_text(json.dumps({"sentence": "custom field"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    manifest = build_shards([tmp_path / "e.txt"], tmp_path / "out2", field="sentence", progress=False)
    assert [t for _, t in _read_all(tmp_path / "out2")] == ["custom field"]
    assert manifest["skipped"]["bad_json"] == 1


def test_skip_accounting_and_dedup(tmp_path):
    raw = b"".join(
        [
            b"  keep one  \n",  # stripped, kept
            b"\n",  # empty
            b"   \t \n",  # empty after strip
            b"bad \xff\xfe utf8\n",  # invalid UTF-8
            b"ab\n",  # too short (min_chars=3)
            b"x" * 51 + b"\n",  # too long (max_chars=50)
            b"keep one\n",  # duplicate of line 1 after stripping
            b"keep two\r\n",  # CRLF
            b"keep three",  # no final newline
        ]
    )
    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbf" + raw)  # with a byte order mark
    (tmp_path / "j.jsonl").write_text('{"text": "keep json"}\nnot json\n{"text": 5}\n["list"]\n{"other": "x"}\n\n')
    manifest = build_shards(
        [tmp_path / "c.txt", tmp_path / "j.jsonl"], tmp_path / "out", dedup=True, min_chars=3, max_chars=50,
        progress=False,
    )
    assert [t for _, t in _read_all(tmp_path / "out")] == ["keep one", "keep two", "keep three", "keep json"]
    assert manifest["skipped"] == {
        "empty": 3, "invalid_utf8": 1, "too_short": 1, "too_long": 1, "duplicate": 1, "bad_json": 4,
    }
    assert manifest["num_lines"] == 9 + 6
    assert manifest["num_samples"] + sum(manifest["skipped"].values()) == manifest["num_lines"]
    # Without --dedup the repeat is kept.
    manifest = build_shards([tmp_path / "c.txt"], tmp_path / "out2", progress=False)
    assert manifest["skipped"]["duplicate"] == 0 and manifest["num_samples"] == 6


def test_same_shards_for_any_number_of_workers(tmp_path):
    lines = _sentences(2500) + _sentences(300)  # with duplicates for dedup
    src = _write(tmp_path / "c.txt", lines)
    one = build_shards([src], tmp_path / "w1", shard_size=128, workers=1, dedup=True, progress=False)
    two = build_shards([src], tmp_path / "w2", shard_size=128, workers=2, dedup=True, progress=False)
    assert one["shards"] == two["shards"] and one["skipped"] == two["skipped"]
    assert one["num_samples"] == 2500 and one["num_shards"] == 20
    for entry in one["shards"]:
        assert (tmp_path / "w1" / entry["name"]).read_bytes() == (tmp_path / "w2" / entry["name"]).read_bytes()


def test_rerun_is_safe_and_a_crash_leaves_no_partial_shard(tmp_path, monkeypatch):
    src = _write(tmp_path / "c.txt", _sentences(40))
    out = tmp_path / "out"
    first = build_shards([src], out, shard_size=5, progress=False)
    assert first["num_shards"] == 8
    again = build_shards([src], out, shard_size=5, progress=False)
    assert again == first  # same input -> same bytes, same manifest

    real = build_module._write_shard

    def crash_on_third(output_dir, index, first_index, texts):
        if index == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(output_dir, index, first_index, texts)

    monkeypatch.setattr(build_module, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_shards([src], out, shard_size=4, progress=False)
    assert not (out / "manifest.json").exists()  # the folder reads as incomplete
    assert not list(out.glob(".*tmp*"))
    for tar in out.glob("shard-*.tar"):  # every shard on disk is a complete archive
        with open(tar, "rb") as fh:
            assert sum(1 for _ in iter_tar_samples(fh, tar.name)) in (4, 5)
    monkeypatch.setattr(build_module, "_write_shard", real)

    fewer = build_shards([src], out, shard_size=20, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert [t for _, t in _read_all(out)] == _sentences(40) and fewer["num_shards"] == 2


def test_user_errors(tmp_path):
    src = _write(tmp_path / "c.txt", ["one sentence"])
    with pytest.raises(UserError, match="not found: .*missing.txt"):
        build_shards([tmp_path / "missing.txt"], tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="matches no file"):
        build_shards([str(tmp_path / "nothing-*.txt")], tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="is a directory"):
        build_shards([tmp_path], tmp_path / "out", progress=False)
    _write(tmp_path / "blank.txt", ["", "   ", ""])
    with pytest.raises(UserError, match="no valid sentences.*empty=3"):
        build_shards([tmp_path / "blank.txt"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(UserError, match="cannot write to output directory|not a directory"):
        build_shards([src], src / "sub", progress=False)  # a path below a regular file
    with pytest.raises(UserError, match="not a directory"):
        build_shards([src], src, progress=False)
    (tmp_path / "broken.txt.gz").write_bytes(gzip.compress(b"a line\n" * 1000)[:-30])
    with pytest.raises(UserError, match="broken.txt.gz: cannot read"):
        build_shards([tmp_path / "broken.txt.gz"], tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="shard size"):
        build_shards([src], tmp_path / "out", shard_size=0, progress=False)


def test_cli_shard(tmp_path, capsys):
    from trainer.cli import main

    src = _write(tmp_path / "c.txt", _sentences(10) + [""])
    assert main(
        ["shard", "--input", str(src), "--output", str(tmp_path / "out"), "--shard-size", "4", "--workers", "1",
         "--dedup", "--min-chars", "2", "--max-chars", "100", "--no-progress"]
    ) == 0
    printed = capsys.readouterr().out
    assert "wrote 10 sentences in 3 shards" in printed and "empty=1" in printed
    assert read_manifest(tmp_path / "out")["options"] == {
        "shard_size": 4, "field": None, "dedup": True, "min_chars": 2, "max_chars": 100,
    }


def _tar_with_tarfile(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        tf.addfile(tarfile.TarInfo("somedir"))  # not a regular file: ignored
        add("a.txt", "first".encode())
        add("a.json", b"{}")  # same sample, another component
        add("b.json", b"{}")  # a sample without txt: not a sample for us
        add("d" * 120 + "/long.txt", b"long name")  # GNU longname / pax path
        add("__key__", b"meta")  # webdataset meta member
        add("c.TXT", "caf\u00e9".encode())
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_reader_on_archives_from_tarfile(fmt):
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the long name
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            info = tarfile.TarInfo("x.txt")
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
        assert list(iter_tar_samples(io.BytesIO(buf.getvalue()), "t")) == [("x", b"hi")]
        return
    samples = list(iter_tar_samples(io.BytesIO(_tar_with_tarfile(fmt)), "t"))
    assert samples == [("a", b"first"), ("d" * 120 + "/long", b"long name"), ("c", "caf\u00e9".encode())]


def test_reader_rejects_truncated_and_corrupt_archives():
    data = tar_bytes([(f"{i:010d}", f"sentence {i}") for i in range(5)])
    # member i: header at 1024 i, its 10 data bytes at 1024 i + 512 (then zero padding to the block)
    for cut in (4096 + 300, 4608 + 4, 512 + 3):  # inside a header, inside member data
        with pytest.raises(ShardError, match="truncated"):
            list(iter_tar_samples(io.BytesIO(data[:cut]), "bad.tar"))
    # Cut exactly at a member boundary: no end-of-archive marker, so truncated too (tests/test_trust_data.py
    # tries every kind of cut).
    with pytest.raises(ShardError, match="truncated tar \\(no end-of-archive marker"):
        list(iter_tar_samples(io.BytesIO(data[:2048]), "short.tar"))
    corrupt = bytearray(data)
    corrupt[1024 + 257 : 1024 + 262] = b"XXXXX"  # third header: magic and checksum no longer match
    with pytest.raises(ShardError, match="bad.tar: corrupt tar header"):
        list(iter_tar_samples(io.BytesIO(bytes(corrupt)), "bad.tar"))
    assert list(iter_tar_samples(io.BytesIO(b""), "empty.tar")) == []
