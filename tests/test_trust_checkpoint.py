"""Issue 12, checkpoints: a crafted checkpoint file never runs code on `--resume`, and any part of a checkpoint
that is corrupt, truncated, missing, foreign or not applied stops the resume with one `error:` line naming it.

One real run is built once per module (a tiny cls_mlp encoder that crashes in step 3, after checkpoints of steps
1 and 2); every case works on a copy of that run folder and resumes from step 2.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_encoder_dir, write_corpus
from trainer.checkpoint import LEGACY_STATE_FILE, STATE_FILE, find_last_checkpoint
from trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this writes `marker`: what an attacker would put in a checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


class Crash(RuntimeError):
    pass


def _overrides(ws: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"model.name_or_path={make_tiny_encoder_dir(ws)}",
        "model.pooler=cls_mlp",  # its head is saved as model/mlp.pt: one more pickle-format file
        "model.max_length=16",
        f"data.train={write_corpus(ws / 'corpus.txt', num_lines=100)}",
        "data.batch_size=8",
        "data.shuffle_buffer=0",
        "optim.lr=1e-3",
        "optim.max_steps=4",
        "optim.warmup_steps=0",
        "checkpoint_every=1",
        "log_every=1",
        "eval.sts_dir=",
        "tracking.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The workspace; `run/` holds checkpoints of steps 1 and 2 and metrics up to step 3."""
    from trainer.config import load_config
    from trainer.engine import train

    ws = tmp_path_factory.mktemp("trust_ckpt")

    def crash(step, loss):
        if step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train(load_config(None, _overrides(ws, ws / "run")), on_step=crash)
    assert find_last_checkpoint(ws / "run").name == "step_00000002"
    return ws


def _copy(built: Path, name: str) -> Path:
    target = built / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(built / "run", target)
    return target


def _resume(built: Path, run: Path, capsys, *extra: str) -> tuple[int, str]:
    """`python -m trainer train ... --resume` in this process: exit code and stderr (a traceback: rc 1)."""
    capsys.readouterr()
    try:
        rc = main(["train", *_overrides(built, run, *extra), "--resume"])
    except Exception as exc:  # noqa: BLE001 - what the command line would show as a traceback
        print(f"Traceback (most recent call last):\n{type(exc).__name__}: {exc}", file=sys.stderr)
        rc = 1
    return rc, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[-1]


def _pickled_files(checkpoint: Path) -> list[str]:
    return sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                  if p.is_file() and p.suffix not in (".json", ".safetensors"))


def test_the_payload_really_runs_code_under_full_pickle(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_crafted_file_anywhere_in_a_checkpoint_never_runs_on_resume(built, capsys, how):
    checkpoint = find_last_checkpoint(built / "run")
    files = _pickled_files(checkpoint)
    # everything that is neither JSON nor safetensors, Accelerate's and ours
    assert {"state/optimizer.bin", "state/random_states_0.pkl", "objective.pt", "model/mlp.pt"} <= set(files), files
    outcomes = {}
    for rel in files:
        marker = built / f"marker_{how}_{rel.replace('/', '_')}"
        run = _copy(built, "tampered")
        target = run / "checkpoints" / checkpoint.name / rel
        if how == "pickle":
            target.write_bytes(pickle.dumps(Payload(marker)))
        else:
            torch.save({"state": Payload(marker), "weights": torch.ones(2)}, target)
        rc, err = _resume(built, run, capsys)
        outcomes[rel] = (marker.exists(), rc, err, target)
    assert not [rel for rel, (ran, *_) in outcomes.items() if ran], "the payload ran"
    for rel, (_, rc, err, target) in outcomes.items():
        assert rc == 2, rel
        line = _error_line(err)
        assert str(target) in line and "refused" in line, line


def test_python_m_trainer_resume_refuses_a_crafted_scheduler_of_the_old_layout(built):
    # The file Accelerate unpickled with weights_only=False before: a checkpoint of the old layout holds it.
    run = _copy(built, "old_layout_attack")
    checkpoint = find_last_checkpoint(run)
    marker = built / "marker_subprocess"
    (checkpoint / "state" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    _make_legacy(checkpoint, keep_scheduler_pickle=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", *_overrides(built, run), "--resume"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "custom_checkpoint_0.pkl" in _error_line(proc.stderr)


def _make_legacy(checkpoint: Path, *, keep_scheduler_pickle: bool = False) -> None:
    """Turn a checkpoint into one written before scheduler.json and the file list existed."""
    if (checkpoint / "scheduler.json").is_file():  # (the code before the fix wrote the old layout itself)
        schedule = json.loads((checkpoint / "scheduler.json").read_text())
        (checkpoint / "scheduler.json").unlink()
        if not keep_scheduler_pickle:
            torch.save(schedule, checkpoint / "state" / "custom_checkpoint_0.pkl")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    state.pop("files", None)
    (checkpoint / STATE_FILE).unlink()  # and the state file under its old name
    (checkpoint / LEGACY_STATE_FILE).write_text(json.dumps(state))


def test_a_checkpoint_of_the_old_layout_resumes_with_its_schedule(built, capsys):
    run = _copy(built, "legacy")
    _make_legacy(find_last_checkpoint(run))
    rc, err = _resume(built, run, capsys)
    assert rc == 0, err[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # linear decay to 0 at step 4: after step 4's update the LR is 0; a schedule restarted at 0 would give 3/4 lr
    assert [(r["step"], r["train/lr"]) for r in rows if r["step"] == 4] == [(4, 0.0)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def _tamper_and_resume(built: Path, capsys, name: str, tamper) -> str:
    run = _copy(built, name)
    checkpoint = find_last_checkpoint(run)
    tamper(checkpoint)
    rc, err = _resume(built, run, capsys)
    assert rc == 2, err[-2000:]
    return _error_line(err)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("rel,expect", [
    ("state/optimizer.bin", "corrupt or truncated"),
    ("state/model.safetensors", "corrupt or truncated"),
    ("model/tokenizer.json", "corrupt or truncated"),
    ("objective.pt", "corrupt or truncated"),
    (STATE_FILE, "corrupt or truncated"),
])
def test_a_truncated_file_is_one_line_naming_it_and_the_checkpoint_before(built, capsys, rel, expect):
    line = _tamper_and_resume(built, capsys, "truncated", lambda ckpt: _truncate(ckpt / rel))
    assert rel.split("/")[-1] in line and expect in line, line
    assert "--resume" in line and "step_00000001" in line, "the earlier checkpoint is offered"


def test_missing_foreign_and_resized_files_are_named(built, capsys):
    line = _tamper_and_resume(built, capsys, "missing", lambda ckpt: (ckpt / "scheduler.json").unlink())
    assert "scheduler.json is missing" in line
    line = _tamper_and_resume(built, capsys, "foreign", lambda ckpt: (ckpt / "state" / "notes.txt").write_text("x"))
    assert "notes.txt was not written by the trainer" in line

    def pad(ckpt: Path) -> None:  # still valid JSON: only the file list sees it
        path = ckpt / "model" / "encoder_config.json"
        path.write_text(path.read_text() + "\n\n")

    line = _tamper_and_resume(built, capsys, "resized", pad)
    assert "encoder_config.json has" in line and "truncated or changed" in line


def test_an_rng_state_that_does_not_load_is_an_error_not_an_info_line(built, capsys):
    # Plain data, so it passes the restricted unpickler; Accelerate fails to apply it and logs that at INFO.
    def plain_but_wrong(ckpt: Path) -> None:
        path = ckpt / "state" / "random_states_0.pkl"
        torch.save({"step": 0, "random_state": "not a state"}, path)
        state = json.loads((ckpt / STATE_FILE).read_text())
        state["files"]["state/random_states_0.pkl"] = path.stat().st_size  # as if written so
        (ckpt / STATE_FILE).write_text(json.dumps(state))

    line = _tamper_and_resume(built, capsys, "rng", plain_but_wrong)
    assert "random_states_0.pkl" in line and "RNG state" in line, line
    line = _tamper_and_resume(built, capsys, "rng_gone", lambda ckpt: (ckpt / "state" / "random_states_0.pkl").unlink())
    assert "random_states_0.pkl is missing" in line


def test_the_deepspeed_allowlist_names_real_classes():
    pytest.importorskip("deepspeed")
    from trainer.checkpoint_files import DEEPSPEED_GLOBALS, _resolve

    for name in DEEPSPEED_GLOBALS:
        assert _resolve(name).__name__ == name.rsplit(".", 1)[1]
