"""benchmarks/fidelity_experiment.py: the plan (same seeds, data and settings for every method; every method's
config valid), the paired statistics, resumability, and the whole pipeline in --smoke mode."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exp():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("fidelity_experiment")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def overrides_of(exp, run, args):
    return dict(o.split("=", 1) for o in exp.run_overrides(run, args, Path("/shards"), "sqlite:///x.db"))


def test_plan_pairs_every_method_with_infonce_on_the_same_seeds_data_and_start(exp, tmp_path):
    from trainer.config import load_config

    args = exp.parse_args(["--output", str(tmp_path), "--seeds", "4", "5", "--steps", "30", "--settings", "cls",
                           "reinit3", "shipped", "--", "optim.lr=2e-5"])
    runs = exp.plan(args, exp.SETTINGS)
    assert {(r["setting"], r["method"]) for r in runs} >= {("reinit3", m) for m in exp.METHODS}
    for setting in exp.SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        assert {r["seed"] for r in mine if r["method"] == "infonce"} == {4, 5}
        shared = None
        for run in mine:
            o = overrides_of(exp, run, args)
            assert o["output_dir"] == str(tmp_path / setting / run["method"] / f"seed{run['seed']}")
            method_keys = {x.split("=", 1)[0] for x in exp.ALL_METHODS[run["method"]][1]}
            common = {k: v for k, v in o.items() if k not in method_keys | {"output_dir", "seed", "tracking.run_name"}}
            assert shared is None or common == shared  # same data, model, steps, lr, eval for every method
            shared = common
        assert shared["data.train"] == "/shards" and shared["optim.max_steps"] == "30" and shared["optim.lr"] == "2e-5"
        assert shared["model.reinit_layers"] == str(exp.SETTINGS[setting][0])
        assert shared["model.pooler"] == exp.SETTINGS[setting][1]
    args = exp.parse_args(["--output", str(tmp_path), "--methods", *exp.ALL_METHODS, "--settings", *exp.SETTINGS])
    for run in exp.plan(args, exp.SETTINGS):  # every method's overrides form a valid config
        cfg = load_config(None, exp.run_overrides(run, args, tmp_path, None))
        assert cfg.seed == run["seed"] and cfg.model.reinit_layers == run["reinit"]
        assert cfg.model.pooler == run["pooler"]


def test_dry_run_prints_commands_and_an_estimate(exp, tmp_path, capsys):
    assert exp.main(["--dry-run", "--output", str(tmp_path), "--settings", "reinit3", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert out.count("python -m trainer train") == 27 and "27 runs; estimated" in out
    assert not (tmp_path / "results.json").exists()


def record(exp, setting, method, seed, dev, train=None):
    return {"setting": setting, "method": method, "seed": seed, "label": exp.ALL_METHODS[method][0],
            "finished": dev is not None, "scores": {} if dev is None else
            {"stsb_dev": dev, "stsb_train": train or dev - 1, "sick_train_trial": dev - 2},
            "best_step": 10, "before": 60.0, "sentences_per_s": 30.0, "mechanisms": {"pos_sim": 0.9}}


def test_paired_differences_against_infonce(exp):
    from fidelity_report import summarize, tables

    records = [record(exp, "s", "infonce", 1, 70.0), record(exp, "s", "infonce", 2, 72.0),
               record(exp, "s", "infonce", 3, 71.0), record(exp, "s", "iftcl", 1, 71.0),
               record(exp, "s", "iftcl", 2, 71.5), record(exp, "s", "iftcl", 3, None)]
    summary = summarize(records)["s"]
    diff = summary["iftcl"]["stsb_dev_diff"]
    assert diff["per_seed"] == [1.0, -0.5] and (diff["wins"], diff["n"]) == (1, 2)
    assert diff["mean_std"][0] == pytest.approx(0.25) and diff["mean_std"][1] == pytest.approx(1.0607, abs=1e-4)
    assert summary["iftcl"]["missing_seeds"] == [3] and summary["infonce"]["stsb_dev"][0] == pytest.approx(71.0)
    text = tables({"s": summary}, {}, {"steps": 5})
    assert "+0.25 +- 1.06 (1/2 seeds higher)" in text and "(missing [3])" in text


def test_interrupted_runs_resume_and_finished_ones_are_skipped(exp, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(exp.subprocess, "run", lambda cmd, cwd: calls.append(cmd) or type("P", (), {"returncode": 0}))
    run = {"dir": tmp_path / "r", "setting": "s", "method": "infonce", "seed": 1}
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    exp.execute(run, ["seed=1"], in_process=False)
    assert calls[-1][3:5] == ["train", "--resume"]
    assert json.loads((tmp_path / "r" / "wall.json").read_text())["wall_s"] >= 0


@pytest.mark.slow
def test_smoke_runs_the_whole_pipeline(exp, tmp_path, monkeypatch):
    out = tmp_path / "smoke"
    assert exp.main(["--smoke", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 2 * len(exp.METHODS) + 2 * 2 and all(r["finished"] for r in runs)
    for r in runs:
        assert set(r["scores"]) == {"stsb_dev", "stsb_train", "sick_train_trial"}
        assert (Path(r["export"]) / "modules.json").is_file() and r["evals"][0][0] == 0
    assert results["summary"]["reinit1"]["iftcl"]["stsb_dev_diff"]["n"] == 2
    assert {p.name for p in (out / "plots").iterdir()} == {
        f"fidelity_{s}_{kind}.png" for s in ("reinit1", "shipped") for kind in ("stsb_dev", "paired")}
    assert "Paired differences against InfoNCE" in (out / "results.md").read_text()

    # resumable: nothing is trained again; the report is rebuilt and published into a page with markers
    monkeypatch.setattr(exp, "execute", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(exp, "finish", lambda *a, **k: pytest.fail("a finished run was evaluated again"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fidelity.md").write_text("# page\n<!-- fidelity-results:start -->\npending\n"
                                      "<!-- fidelity-results:end -->\ntail\n")
    assert exp.main(["--smoke", "--output", str(out), "--publish", str(docs)]) == 0
    page = (docs / "fidelity.md").read_text()
    assert "pending" not in page and "### Setting `reinit1`" in page and page.endswith("tail\n")
    assert (docs / "fidelity_reinit1_paired.png").is_file()
