import csv
from pathlib import Path

import pytest

from trainer.compare import compare
from trainer.config import TrackingConfig
from trainer.errors import UserError
from trainer.tracking import Tracker, uri_from_location


def _fake_run(tmp_path, name, loss_name, scores, **params):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="cmp", run_name=name)
    tracker = Tracker(cfg, tmp_path / name, active=True)
    tracker.log_params({"loss.name": loss_name, "optim.lr": 1e-5, "global_batch": 64, **params})
    for step in range(1, 11):
        tracker.log_metrics({"train/loss": 3.0 / step, "throughput/sentences_per_s": 100.0}, step)
    for step, score in zip((0, 5, 10), scores):
        tracker.log_metrics({"eval/stsb_dev": score}, step)
    tracker.log_metrics({"sts/stsb_dev": max(scores), "sts/sickr_trial": 70.0}, 0)
    tracker.finish()
    return cfg.uri


def test_compare_table_csv_and_plots(tmp_path):
    uri = _fake_run(tmp_path, "a", "infonce", [80.0, 82.5, 81.0])
    _fake_run(tmp_path, "b", "softcse", [80.0, 79.0, 83.25], **{"loss.softcse_mode": "temperature"})
    table, files = compare("cmp", uri, tmp_path / "out")
    lines = table.splitlines()
    assert len(lines) == 4 and "softcse-temperature" in table
    row_a = lines[2].split("|")
    assert " 81.00 " in row_a and " 82.50 " in row_a  # final and best
    names = {f.name for f in files}
    assert {"runs.md", "runs.csv", "loss.png", "stsb_dev.png", "sts_tasks.png"} <= names
    for f in files:
        assert f.stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))
    assert [r["run"] for r in rows] == ["a", "b"] and rows[1]["STS-B dev best"] == "83.25"


def test_compare_errors(tmp_path):
    uri = _fake_run(tmp_path, "a", "infonce", [1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="no experiment"):
        compare("nope", uri, tmp_path / "out")
    assert uri_from_location(str(tmp_path)) == uri
    with pytest.raises(UserError, match="no MLflow store"):
        uri_from_location(str(tmp_path / "missing"))


def test_compare_merges_the_stores_of_several_run_folders(tmp_path):
    from trainer.compare import stores

    _fake_run(tmp_path / "r1", "a", "infonce", [1.0, 2.0, 3.0])
    _fake_run(tmp_path / "r2", "b", "iftcl", [1.0, 2.0, 4.0])
    uris = stores(str(tmp_path))
    assert len(uris) == 2
    table, _ = compare("cmp", uris, tmp_path / "out")
    assert "| a |" in table and "| b |" in table and "iftcl" in table


def test_replay_creates_a_run_that_could_not_be_started(tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.tracking import FALLBACK_FILE, replay_fallback

    dead = TrackingConfig(uri="http://127.0.0.1:9", experiment="offline")  # nothing listens on port 9
    tracker = Tracker(dead, tmp_path / "run", active=True)
    assert tracker.degraded and tracker.run_id is None
    tracker.log_params({"optim.lr": 1e-5})
    tracker.log_metrics({"train/loss": 2.0}, 1)
    tracker.finish()
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay_fallback(tmp_path / "run", uri) == 4
    assert not (tmp_path / "run" / FALLBACK_FILE).exists()
    assert replay_fallback(tmp_path / "run", uri) == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("offline").experiment_id])
    assert run.data.metrics["train/loss"] == 2.0 and run.info.status == "FINISHED"


def test_cli_compare_prints_the_table_and_the_files(tmp_path, monkeypatch, capsys):
    from trainer.cli import main

    _fake_run(tmp_path / "r1", "a", "infonce", [1.0, 2.0, 3.0])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare", "--experiment", "cmp"]) == 2
    assert "give --tracking-uri" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "r1"))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--experiment", "cmp"]) == 0
    out = capsys.readouterr().out
    assert "| a |" in out and f"wrote {Path('compare') / 'cmp' / 'runs.md'}" in out
    assert (tmp_path / "compare" / "cmp" / "loss.png").is_file()
