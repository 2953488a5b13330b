"""The frozen initial encoder (weight_source=frozen, twins_reference=initial) and the mechanism metrics in the
training loop: an eval-mode copy that draws no RNG, is the encoder as training started (also after a resume),
and the metrics land in metrics.jsonl on logged steps only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_engine import BagOfTokens, Crash, tiny_config
from trainer.config import LossConfig
from trainer.engine import train
from trainer.frozen import FrozenEncoder, attach_frozen, step_inputs
from trainer.losses import build_objective
from trainer.step import forward_backward, step_loss


class Dropped(BagOfTokens):
    """BagOfTokens with dropout: the frozen copy must switch it off."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        m = attention_mask.unsqueeze(-1).float()
        x = torch.nn.functional.dropout(self.emb(input_ids), 0.5, self.training)
        return torch.nn.functional.normalize((x * m).sum(1) / m.sum(1), dim=-1)


def batch_of(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, 6), generator=g)
    fraternal = ids.clone()
    fraternal[1:, 2] = (fraternal[1:, 2] % 19) + 1  # row 0 unchanged
    ones = torch.ones(n, 6, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": ones, "fraternal_input_ids": fraternal,
            "fraternal_attention_mask": ones}


def test_frozen_copy_is_eval_mode_no_grad_draws_no_rng_and_stays_put():
    torch.manual_seed(0)
    model = Dropped().train()
    frozen = FrozenEncoder(model)
    batch = batch_of()
    state = torch.get_rng_state()
    views = frozen.embed(batch, candidates=True, fraternal=True)
    assert torch.equal(torch.get_rng_state(), state)  # the trained model's dropout masks are unaffected
    assert not views.anchors.requires_grad and views.candidates.shape == (4, 8)
    model.eval()
    torch.testing.assert_close(views.anchors, model(batch["input_ids"], batch["attention_mask"]))
    with torch.no_grad():
        model.emb.weight.add_(1.0)  # training the model does not move its frozen copy
    torch.testing.assert_close(frozen.embed(batch, candidates=False, fraternal=False).anchors, views.anchors)


def test_step_loss_gives_the_objective_frozen_views_and_unchanged_rows():
    torch.manual_seed(0)
    model = Dropped()
    objective = build_objective(LossConfig(name="iftcl", kernel="chunked", twins_reference="initial",
                                           twins_exclude_unchanged=True))
    attach_frozen(objective, model)
    batch = batch_of()
    inputs = step_inputs(objective, batch)
    assert inputs["fraternal_unchanged"].tolist() == [True, False, False, False]
    assert inputs["frozen"].candidates is None and inputs["frozen"].fraternal.shape == (4, 8)
    out, _ = step_loss(model, batch, objective, 0)
    assert out["fraternal_unchanged_frac"].item() == 0.25 and {"margin_mean", "hinge_active_frac"} <= set(out)
    cached, _ = forward_backward(model, batch, objective, 0, mini_batch_size=2)  # the cached path passes them too
    assert cached["fraternal_unchanged_frac"].item() == 0.25 and torch.isfinite(cached["loss"])
    plain = build_objective(LossConfig(name="infonce"))
    attach_frozen(plain, model)
    assert plain.frozen is None and step_inputs(plain, batch) == {}


def rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


MECHANISMS = {
    "softcse": ["train/pos_sim", "train/neg_softmax_mass", "train/hardest_neg_sim", "train/hardest_neg_weight"],
    "iftcl": ["train/pos_sim", "train/neg_softmax_mass", "train/hardest_neg_sim", "train/margin_mean",
              "train/hinge_active_frac", "train/fraternal_unchanged_frac", "train/queue_fill"],
}


@pytest.mark.parametrize("name, extra", [
    ("softcse", ["loss.weight_source=frozen", "loss.gamma=1.0"]),
    ("iftcl", ["loss.twins_reference=initial", "loss.twins_exclude_unchanged=true", "loss.queue_size=12",
               "data.augment.max_redraws=2", "loss.fraternal_weight=0.5", "loss.twins_stop_grad_identical=true"]),
])
def test_the_loop_logs_the_mechanisms(tmp_path, name, extra):
    cfg = tiny_config(tmp_path, name, f"loss.name={name}", *extra, "optim.max_steps=4", "log_every=2",
                      "eval.sts_dir=", "tracking.enabled=false")
    train(cfg)
    logged = rows(cfg)
    assert [r["step"] for r in logged] == [2, 4]
    for row in logged:
        for key in MECHANISMS[name]:
            assert key in row and isinstance(row[key], float), key
        assert -1.0 <= row["train/hardest_neg_sim"] <= 1.0 and 0.0 <= row["train/neg_softmax_mass"] <= 1.0
    if name == "iftcl":
        assert logged[-1]["train/queue_fill"] == 1.0 and "train/margin" not in logged[-1]


@pytest.mark.slow
def test_resume_keeps_the_initial_encoder_as_the_frozen_one(tmp_path):
    extra = ["loss.name=softcse", "loss.weight_source=frozen", "loss.gamma=2.0", "optim.max_steps=6",
             "checkpoint_every=3", "eval.sts_dir=", "tracking.enabled=false", "model.reinit_layers=1"]
    reference = train(tiny_config(tmp_path, "straight", *extra))
    cfg = tiny_config(tmp_path, "crashed", *extra)

    def crash(step, loss):
        if step == 4:
            raise Crash()

    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    resumed = train(cfg, resume=True)
    expected = dict(reference.losses)
    assert [s for s, _ in resumed.losses] == [4, 5, 6]
    for step, loss in resumed.losses:  # a frozen copy of the checkpoint instead would change these
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
