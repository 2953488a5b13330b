"""benchmarks/loss_experiment.py: same seed/data/steps for every method, one MLflow experiment, the table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("loss_experiment", ROOT / "benchmarks" / "loss_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_gets_the_same_seed_data_steps_and_experiment(tmp_path):
    exp = load_script()
    args = exp.parse_args(["--steps", "30", "--output", str(tmp_path), "--seed", "7", "--", "optim.lr=2e-5"])
    plans = [exp.train_command(m, args, tmp_path / "shards", "sqlite:///x.db") for m in exp.METHODS]
    shared = None
    for method, (cmd, out_dir) in zip(exp.METHODS, plans):
        assert cmd[cmd.index("--config") + 1].endswith(f"{method}_minilm_cpu.yaml")
        overrides = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in cmd[cmd.index("--config") + 2:]}
        assert overrides["output_dir"] == str(out_dir) and overrides["tracking.run_name"] == method
        common = {k: v for k, v in overrides.items() if k not in ("output_dir", "tracking.run_name")}
        assert shared is None or common == shared
        shared = common
    assert shared["seed"] == "7" and shared["optim.max_steps"] == "30" and shared["optim.lr"] == "2e-5"
    assert shared["data.train"] == str(tmp_path / "shards") and shared["tracking.uri"] == "sqlite:///x.db"


def test_summary_and_table_from_metrics(tmp_path):
    exp = load_script()
    rows = [{"step": 0, "eval/stsb_dev": 80.0}, {"step": 10, "train/loss": 1.5, "throughput/sentences_per_s": 30.0},
            {"step": 10, "eval/stsb_dev": 82.5}, {"step": 20, "train/loss": 1.2, "throughput/sentences_per_s": 34.0},
            {"step": 20, "eval/stsb_dev": 81.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = exp.summarize("iftcl", tmp_path, 120.0)
    assert (summary["stsb_dev_before"], summary["stsb_dev_best"], summary["best_step"]) == (80.0, 82.5, 10)
    assert (summary["stsb_dev_last"], summary["final_train_loss"], summary["sentences_per_s"]) == (81.0, 1.2, 32.0)
    text = exp.table([summary, exp.summarize("simcse", tmp_path / "missing", None)])
    assert "| IFTCL | 80.00 | 82.50 (10) | 81.00 (20) | 1.2000 | 32.0 | 2.0 |" in text
    assert "| InfoNCE (SimCSE) | n/a |" in text
