"""End-to-end training on a tiny random BERT: loss goes down, MLflow gets the run, resume is exact; the
checkpoint layout, and the queue filled by the loop (not through the loss dict)."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_encoder_dir, write_corpus, write_stsb_dev
from trainer.checkpoint import STATE_FILE, TrainState, find_last_checkpoint
from trainer.config import LossConfig, load_config
from trainer.engine import train
from trainer.errors import UserError
from trainer.losses import build_objective
from trainer.step import step_loss


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
    assert run.data.params["mixed_precision_effective"] == "no"  # the winner of run config / launcher / default
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


class BagOfTokens(torch.nn.Module):
    """Masked mean of token embeddings, L2-normalised: the SentenceEncoder call signature, no dropout."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        m = attention_mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((self.emb(input_ids) * m).sum(1) / m.sum(1), dim=-1)


def test_step_loss_takes_the_rank_and_returns_the_candidates_apart():
    torch.manual_seed(0)
    model, objective = BagOfTokens(), build_objective(LossConfig(name="infonce", queue_size=6, kernel="chunked"))
    batch = {"input_ids": torch.randint(1, 20, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    out, candidates = step_loss(model, batch, objective, 0)
    assert "_candidates" not in out and "queue_len" in out
    assert all(v.numel() == 1 for v in out.values()), "the loss dict holds the loss and scalar logs only"
    assert candidates.shape == (4, 8) and not candidates.requires_grad
    out["loss"].backward()
    objective.enqueue(candidates)
    torch.testing.assert_close(objective.queue.negatives(), candidates)


def test_the_loop_fills_the_queue_and_keeps_the_checkpoint_layout(tmp_path):
    cfg = tiny_config(tmp_path, "queue", "loss.name=iftcl", "loss.queue_size=12", "optim.max_steps=3",
                      "eval.sts_dir=", "log_every=1", "tracking.enabled=false")
    train(cfg)
    out = Path(cfg.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # logged before each step's enqueue: 0, then 8 rows (batch 8, one process), then capped at 12
    assert [(r["step"], r["train/queue_len"]) for r in rows] == [(1, 0.0), (2, 8.0), (3, 12.0)]
    last = find_last_checkpoint(out)
    assert last.name == "step_00000003"
    assert {p.name for p in last.iterdir()} == {"state", "model", "objective.pt", "scheduler.json", STATE_FILE}
    assert not list(last.glob("state/custom_checkpoint_*")), "nothing of ours is pickled by Accelerate"
    assert json.loads((last / "scheduler.json").read_text())["last_epoch"] == 3
    queue = torch.load(last / "objective.pt", weights_only=True)["queue"]
    assert queue["count"] == 12 and queue["buffer"].shape[0] == 12
    state = json.loads((last / STATE_FILE).read_text())
    assert list(state) == ["step", "best_score", "initial_score", "run_id", "data", "files"] and state["step"] == 3
    assert state["files"]["objective.pt"] == (last / "objective.pt").stat().st_size
    assert TrainState.from_json((last / STATE_FILE).read_text()).data == state["data"]
