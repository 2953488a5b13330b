"""End-to-end training on a tiny random BERT: loss goes down, MLflow gets the run, resume is exact."""

from pathlib import Path

import pytest

from tests.helpers import make_tiny_encoder_dir, write_corpus, write_stsb_dev
from trainer.config import load_config
from trainer.engine import find_last_checkpoint, train
from trainer.errors import UserError


def tiny_config(tmp_path: Path, name: str, *extra: str):
    corpus = write_corpus(tmp_path / "corpus.txt", num_lines=240)
    sts = write_stsb_dev(tmp_path / "sts")
    return load_config(
        None,
        [
            f"output_dir={tmp_path / name}",
            f"model.name_or_path={make_tiny_encoder_dir(tmp_path)}",
            "model.pooler=cls",
            "model.max_length=16",
            f"data.train={corpus}",
            "data.batch_size=8",
            "data.shuffle_buffer=32",
            "optim.lr=1e-3",
            "optim.max_steps=20",
            "optim.warmup_steps=2",
            f"eval.sts_dir={sts}",
            "eval.every_steps=10",
            "log_every=5",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=test-engine",
            *extra,
        ],
    )


def test_twenty_steps_loss_decreases_and_logs_to_mlflow(tmp_path):
    cfg = tiny_config(tmp_path, "run")
    result = train(cfg)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    out = Path(cfg.output_dir)
    assert (out / "best" / "encoder_config.json").is_file()
    assert find_last_checkpoint(out).name == "step_00000020"
    assert (out / "export" / "modules.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001"
    for key in ("train/loss", "train/lr", "eval/stsb_dev", "throughput/sentences_per_s"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(result.run_id, "eval/stsb_dev")] == [0, 10, 20]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in artifacts and "export" in artifacts


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_continues_the_same_run(tmp_path):
    # dropout on: the resumed run must also restore the RNG to reproduce the dropout masks.
    reference = train(tiny_config(tmp_path, "straight", "checkpoint_every=5"))

    cfg = tiny_config(tmp_path, "crashed", "checkpoint_every=5")

    def crash(step, loss):
        if step == 13:
            raise Crash()

    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    assert find_last_checkpoint(cfg.output_dir).name == "step_00000010"
    with pytest.raises(UserError, match="--resume"):
        train(cfg)
    resumed = train(cfg, resume=True)
    assert [s for s, _ in resumed.losses] == list(range(11, 21))
    expected = dict(reference.losses)
    for step, loss in resumed.losses:
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert resumed.run_id is not None
