"""A real `mlflow server` on loopback: a tiny training run logs to it; when it dies mid-run nothing is lost."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trainer.config import TrackingConfig
from trainer.tracking import FALLBACK_FILE, Tracker, replay_fallback

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root", (tmp_path / "artifacts").as_uri(),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_training_logs_to_a_server_then_survives_its_death(tmp_path, mlflow_server, caplog):
    from mlflow.tracking import MlflowClient

    from tests.test_engine import tiny_config
    from trainer.engine import train

    url, proc = mlflow_server
    # A login in the URI (this server ignores it): the run connects with it, and it is saved nowhere.
    with_login = url.replace("http://", "http://alice:s3cret@")
    cfg = tiny_config(tmp_path, "run", f"tracking.uri={with_login}", "optim.max_steps=6", "eval.every_steps=3",
                      "log_every=2")
    result = train(cfg)
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [2, 4, 6]
    assert "sts/stsb_dev" in run.data.metrics
    assert run.data.params["tracking.uri"] == url.replace("http://", "http://alice:***@")
    assert result.tracking_uri == url.replace("http://", "http://alice:***@")
    saved = Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert "alice:***@" in saved and "s3cret" not in saved

    # The server dies in the middle of a run: logging goes on, one warning, everything lands in the fallback.
    tracker = Tracker(TrackingConfig(uri=url, experiment="outage"), tmp_path / "outage", active=True)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=20)
    caplog.set_level(logging.WARNING, logger="trainer.tracking")
    for step in range(2, 6):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.finish()
    warnings = [r for r in caplog.records if "MLflow at" in r.getMessage()]
    assert len(warnings) == 1
    spooled = [json.loads(line) for line in (tmp_path / "outage" / FALLBACK_FILE).read_text().splitlines()]
    assert [r["step"] for r in spooled if r["op"] == "metrics"] == [2, 3, 4, 5]
    assert spooled[-1] == {**spooled[-1], "op": "finish", "run_id": tracker.run_id}

    # replay into a store that has the run (here: the server's own database, read directly)
    sent = replay_fallback(tmp_path / "outage", f"sqlite:///{tmp_path / 'server.db'}")
    assert sent == 5
    history = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'server.db'}").get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
