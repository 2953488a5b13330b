"""Issue 12, outputs and tracking: one run per output folder, export never deletes what is not an export, failed
writes are named, metrics.jsonl and MLflow hold each step once after a resume, credentials never leave the
process, and a run whose MLflow was down says where its records wait and how to send them."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_tiny_encoder_dir, write_corpus
from trainer.cli import main
from trainer.config import ConfigError, OptimConfig, TrackingConfig, load_config
from trainer.errors import UserError
from trainer.outputs import OutputLock, writing
from trainer.redact import redact

ROOT = Path(__file__).resolve().parents[1]


def _overrides(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        f"output_dir={tmp_path / name}",
        f"model.name_or_path={make_tiny_encoder_dir(tmp_path)}",
        "model.max_length=16",
        f"data.train={write_corpus(tmp_path / 'corpus.txt', num_lines=100)}",
        "data.batch_size=8",
        "data.shuffle_buffer=0",
        "optim.lr=1e-3",
        "optim.max_steps=2",
        "log_every=1",
        "eval.sts_dir=",
        "tracking.enabled=false",
        *extra,
    ]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[-1]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------
# 9: one run per output folder


def test_a_second_run_on_the_same_output_dir_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    live = OutputLock(out).acquire()  # a run in progress (another process in real life: flock is per open file)
    try:
        assert main(["train", *_overrides(tmp_path, "run")]) == 2
        line = _error_line(capsys.readouterr().err)
        assert "in use by another run" in line and f"pid {os.getpid()}" in line
        assert not (out / "metrics.jsonl").exists()
    finally:
        live.release()
    OutputLock(out).acquire().release()  # the refused run took nothing with it


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.outputs import OutputLock; "
         "lock = OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="in use by another run"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (tmp_path / ".run.lock").read_text().startswith("pid ")  # the file stays; the lock went with the process
    OutputLock(tmp_path).acquire().release()


# ----------------------------------------------------------------------------------------------------------
# 8: export


def test_export_refuses_a_folder_that_is_not_an_earlier_export(tmp_path, capsys):
    model = make_tiny_encoder_dir(tmp_path)
    run = tmp_path / "my_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["export", "--checkpoint", str(model), "--output", str(run)]) == 2
    assert "not empty and is not an earlier export" in _error_line(capsys.readouterr().err)
    assert (run / "metrics.jsonl").is_file(), "nothing was deleted"

    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(model), "--output", str(out)]) == 0
    assert main(["export", "--checkpoint", str(model), "--output", str(out)]) == 0, "an earlier export is replaced"
    assert main(["export", "--checkpoint", str(model), "--output", str(run), "--overwrite"]) == 0
    assert not (run / "metrics.jsonl").exists() and (run / "modules.json").is_file()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(model), "--output", str(tmp_path), "--overwrite"]) == 2
    assert "holds the checkpoint" in _error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------------
# One line for failed writes; the tracking fallback does not hide them


def test_a_full_disk_is_named_not_hidden_by_the_tracking_fallback(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    # /dev/full answers every write with ENOSPC: the metrics file and the MLflow spool both sit on a "full disk"
    (out / "metrics.jsonl").symlink_to("/dev/full")
    (out / "mlflow_fallback.jsonl").symlink_to("/dev/full")
    rc = main(["train", *_overrides(tmp_path, "full", "tracking.enabled=true",
                                    f"tracking.uri=http://127.0.0.1:{_dead_port()}")])
    assert rc == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: could not write metrics {out / 'metrics.jsonl'}: No space left on device"), line


def test_an_output_dir_that_cannot_be_created_is_named(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["train", *_overrides(tmp_path, "a_file/run")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"could not write the output folder {tmp_path / 'a_file' / 'run'}" in line, line


def test_torch_and_safetensors_write_failures_are_recognised(tmp_path):
    with pytest.raises(UserError, match=r"could not write checkpoint .*ckpt: .*unexpected pos 576 vs 534; \d+ MiB free"):
        with writing("checkpoint", tmp_path / "ckpt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(ZeroDivisionError):  # not a write failure: not dressed up as one
        with writing("checkpoint", tmp_path / "ckpt"):
            raise ZeroDivisionError()


# ----------------------------------------------------------------------------------------------------------
# 10: metrics after a resume


class Crash(RuntimeError):
    pass


def test_after_resume_each_step_is_logged_once(tmp_path):
    from trainer.engine import train
    from trainer.tracking import metric_history

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, _overrides(tmp_path, "run", "optim.max_steps=5", "checkpoint_every=2",
                                       "tracking.enabled=true", f"tracking.uri={uri}"))

    def crash(step, loss):
        if step == 3:  # after step 3's metrics, before a checkpoint: step 3 is redone after the resume
            raise Crash()

    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    resumed = train(cfg, resume=True)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    final = dict(resumed.losses)
    assert [r["train/loss"] for r in rows[2:]] == pytest.approx([final[s] for s in (3, 4, 5)], rel=1e-6)
    # MLflow keeps both values of step 3; the latest (the resumed run's) is the one read back
    history = metric_history(resumed.run_id, "train/loss", uri)
    assert [s for s, _ in history] == [1, 2, 3, 4, 5]
    assert history[2][1] == pytest.approx(final[3], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Security 3: credentials; and the summary + replay when MLflow is down


def test_redact_masks_passwords_and_token_like_query_values():
    assert redact("http://alice:s3cret@mlflow:5000") == "http://alice:***@mlflow:5000"
    assert redact("https://ghp_abc@host/x") == "https://***@host/x"
    assert redact("postgresql://u:pw@db/mlflow?sslmode=require") == "postgresql://u:***@db/mlflow?sslmode=require"
    assert redact("https://h/p?token=abc&run=1&api_key=z") == "https://h/p?token=***&run=1&api_key=***"
    assert redact("pipe:curl -s 'https://b/s.tar?X-Amz-Signature=f00&X-Amz-Date=1'") == \
        "pipe:curl -s 'https://b/s.tar?X-Amz-Signature=***&X-Amz-Date=1'"
    for plain in ("sqlite:////tmp/x/mlflow.db", "http://127.0.0.1:5000", "http://host/path@v2", "runs/a"):
        assert redact(plain) == plain


def test_credentials_never_leave_the_process_and_the_summary_tells_how_to_replay(tmp_path, capsys, caplog):
    from mlflow.tracking import MlflowClient

    secret = "s3cret-Pa55"
    uri = f"http://alice:{secret}@127.0.0.1:{_dead_port()}"
    caplog.set_level(logging.INFO)
    assert main(["train", *_overrides(tmp_path, "run", "tracking.enabled=true", f"tracking.uri={uri}")]) == 0
    out = tmp_path / "run"
    captured = capsys.readouterr()
    assert main(["train", "--print-config", f"tracking.uri={uri}"]) == 0
    printed = capsys.readouterr().out
    assert "alice:***@127.0.0.1" in printed
    written = [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in (".yaml", ".jsonl", ".json")]
    for text in (captured.out, captured.err, caplog.text, printed, *written):
        assert secret not in text
    spooled = [json.loads(line) for line in (out / "mlflow_fallback.jsonl").read_text().splitlines()]
    params = next(r["params"] for r in spooled if r["op"] == "params")
    assert params["tracking.uri"] == uri.replace(secret, "***")

    # the summary: where the records are and the command that sends them; never "MLflow: off"
    assert "MLflow: off" not in captured.out
    assert f"{len(spooled)} records for the run (not created yet) are spooled in {out / 'mlflow_fallback.jsonl'}" \
        in captured.out
    assert f"python -m trainer tracking replay --output-dir {out}" in captured.out

    # the saved URI lost its password: replay asks for it rather than failing at the server
    assert main(["tracking", "replay", "--output-dir", str(out)]) == 2
    assert "--tracking-uri" in _error_line(capsys.readouterr().err)
    # a store that is still down keeps every record for the next try
    assert main(["tracking", "replay", "--output-dir", str(out), "--tracking-uri", f"http://127.0.0.1:{_dead_port()}"]) == 2
    assert "run the command again later" in _error_line(capsys.readouterr().err)
    assert len((out / "mlflow_fallback.jsonl").read_text().splitlines()) == len(spooled)
    store = f"sqlite:///{tmp_path / 'replayed.db'}"
    assert main(["tracking", "replay", "--output-dir", str(out), "--tracking-uri", store]) == 0
    assert f"sent {len(spooled)} records" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("contrastive-embeddings").experiment_id])
    assert run.data.params["tracking.uri"] == uri.replace(secret, "***")
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics


def test_a_resumed_run_keeps_its_run_id_while_the_server_is_down(tmp_path):
    from trainer.tracking import Tracker

    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_dead_port()}")
    tracker = Tracker(cfg, tmp_path, run_id="run-before-the-crash")
    tracker.log_metrics({"train/loss": 1.0}, 3)
    assert tracker.run_id == "run-before-the-crash"
    spooled = [json.loads(line) for line in (tmp_path / "mlflow_fallback.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in spooled} == {"run-before-the-crash"}, "replayed into the same run later"


# ----------------------------------------------------------------------------------------------------------
# One line for bad values: a file: tracking store, a non-finite number


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "/abs/mlruns"])
def test_a_file_tracking_store_is_refused_with_the_sqlite_alternative(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match=r"tracking\.uri: .*file store, which MLflow 3 refuses.*sqlite:///"):
        load_config(None, [f"tracking.uri={uri}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the same store reached through the environment
    from trainer.tracking import Tracker

    with pytest.raises(UserError, match=r"\$MLFLOW_TRACKING_URI: .*MLflow 3 refuses"):
        Tracker(TrackingConfig(), "unused", active=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in still works
    assert load_config(None, [f"tracking.uri={uri}"]).tracking.uri == uri


@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.lr=.inf", "optim.lr=1e999", "loss.temperature=.inf",
                                      "optim.max_grad_norm=.nan"])
def test_a_non_finite_number_is_a_config_error(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: expected a finite number"):
        load_config(None, [override])


def test_optim_config_refuses_a_nan_lr_built_in_code():
    with pytest.raises(ConfigError, match=r"optim\.lr must be finite"):
        OptimConfig(lr=float("nan"))
