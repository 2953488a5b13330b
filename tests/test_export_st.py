"""The export is written through the sentence-transformers API: its config files, a model card with the run's
config and STS table, cosine similarity, and a load with no "MISSING / newly initialized" report or warning;
`--push-to-hub` up to the Hub call."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from tests.helpers import make_tiny_encoder_dir
from trainer.export import export
from trainer.model import SentenceEncoder

SENTENCES = ["the city of water", "a red house on the river", "music"]


@pytest.fixture
def run_best(tmp_path):
    """A run folder as training leaves it: best/, config.yaml and sts_results.json."""
    run = tmp_path / "run"
    model = SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="cls_mlp", max_length=16)
    model.save(run / "best")
    (run / "config.yaml").write_text("output_dir: runs/x\nloss:\n  name: softcse\n", encoding="utf-8")
    (run / "sts_results.json").write_text(json.dumps({"stsb_dev": 81.234, "sickr_test": 70.5}))
    return run, model


def test_export_loads_in_sentence_transformers_without_any_report(run_best, capfd, caplog):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    run, model = run_best
    out = export(run / "best", run / "export")
    capfd.readouterr()
    hf_logging.enable_propagation()  # transformers' logger does not propagate by default: let caplog see it
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            st = SentenceTransformer(str(out), device="cpu")
            theirs = torch.as_tensor(st.encode(SENTENCES, convert_to_numpy=True))
    finally:
        hf_logging.disable_propagation()
    printed = capfd.readouterr()
    text = printed.out + printed.err + caplog.text
    assert "MISSING" not in text and "newly initialized" not in text and "LOAD REPORT" not in text, text
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(theirs, model.encode(SENTENCES), atol=1e-5, rtol=1e-5)
    assert st.similarity_fn_name == "cosine" and st.max_seq_length == 16


def test_export_folder_and_model_card(run_best):
    run, _ = run_best
    out = export(run / "best", run / "export")
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["similarity_fn_name"] == "cosine"
    assert json.loads((out / "sentence_bert_config.json").read_text())["model_kwargs"] == {"add_pooling_layer": False}
    assert [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())] == [
        "Transformer", "Pooling", "Normalize"]
    assert not (out / ".backbone").exists()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "| stsb_dev   |         81.23 |" in card and "name: softcse" in card


def test_push_to_hub_calls_the_hub_api(run_best, monkeypatch, capsys):
    import huggingface_hub

    from trainer.cli import main

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["repo_type"], kwargs["exist_ok"]))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run, _ = run_best
    out = run / "export"
    assert main(["export", "--checkpoint", str(run / "best"), "--output", str(out), "--push-to-hub", "me/model"]) == 0
    assert calls == [("init", None), ("create_repo", "me/model", "model", True), ("upload_folder", "me/model", str(out))]
    assert "pushed to https://huggingface.co/me/model" in capsys.readouterr().out
