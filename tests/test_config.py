from pathlib import Path

import pytest

from trainer.config import ConfigError, TrainConfig, describe, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]
RUN_YAMLS = sorted((ROOT / "launch_configs" / "runs").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: p.name)
def test_every_shipped_run_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)


def test_shipped_yamls_exist():
    assert any(p.name == "demo_cpu.yaml" for p in RUN_YAMLS)


def test_unknown_key_names_the_dotted_key(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("optim:\n  lr: 1e-5\n  lrr: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(f)


def test_wrong_type_names_the_key(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("data:\n  batch_size: sixty-four\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"model\.pooler"):
        load_config(None, ["model.pooler=max"])
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(None, ["data.batch_size=true"])


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-5", "data.batch_size=8", "loss.name=softcse", "tracking.uri=null"])
    assert cfg.optim.lr == pytest.approx(1e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 8 and cfg.loss.name == "softcse" and cfg.tracking.uri is None
    with pytest.raises(ConfigError, match="optim.nope"):
        load_config(None, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["optim.lr"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["loss.temperature=0"])
    with pytest.raises(ConfigError, match="warmup"):
        load_config(None, ["optim.max_steps=10", "optim.warmup_steps=20"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_every_field_has_a_docstring():
    rows = describe()
    assert len(rows) > 30
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented, undocumented


def test_flatten_is_the_resolved_config():
    flat = flatten(load_config(None, ["optim.lr=2e-5"]))
    assert flat["optim.lr"] == 2e-5 and "loss.temperature" in flat and "data.augment.deletion_rate" in flat


def test_config_classes_have_slots_so_a_typo_in_code_raises():
    cfg = TrainConfig()
    cfg.optim.lr = 1e-4  # a real field still assigns
    with pytest.raises(AttributeError):
        cfg.optim.lrr = 1
    with pytest.raises(AttributeError):
        cfg.eval.every_step = 5
    assert describe()[0][2], "field docstrings are still found on the slotted classes"


@pytest.mark.parametrize("override,match", [
    ("eval.batch_size=0", r"eval\.batch_size"),
    ("eval.every_steps=-1", r"eval\.every_steps"),
    ("eval.final_tasks=[stsb_dev, sts17]", r"eval\.final_tasks.*'sts17'"),
    ("tracking.experiment=", r"tracking\.experiment"),
    ("tracking.uri=sqlite://runs/mlflow.db", r"tracking\.uri.*sqlite:///"),
    ("model.name_or_path=", r"model\.name_or_path"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay"),
    ("output_dir=", "output_dir"),
])
def test_every_section_validates_at_load_time(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_valid_edge_values_still_load():
    cfg = load_config(None, ["eval.every_steps=0", "eval.sts_dir=", "tracking.uri=sqlite:////tmp/x/mlflow.db",
                             "eval.final_tasks=[]", "tracking.run_name="])
    assert not cfg.eval.enabled and not cfg.eval.due(125)


def test_derived_values_are_config_methods():
    cfg = load_config(None, ["data.batch_size=16", "optim.grad_accum=4", "optim.max_steps=100", "log_every=30",
                             "eval.every_steps=25", "checkpoint_every=40", "eval.sts_dir=data/sts"])
    assert cfg.global_batch_size(8) == 128
    assert cfg.sentences_per_step(8) == 512 and cfg.sentences_per_step(1) == 64
    assert [s for s in range(1, 101) if cfg.log_due(s)] == [30, 60, 90, 100]  # and always the last step
    assert [s for s in range(1, 101) if cfg.eval.due(s)] == [25, 50, 75, 100]
    assert [s for s in range(1, 101) if cfg.checkpoint_due(s)] == [25, 40, 50, 75, 80, 100]
    off = load_config(None, ["eval.sts_dir=", "checkpoint_every=0"])
    assert not off.eval.enabled and not any(off.eval.due(s) or off.checkpoint_due(s) for s in range(1, 1000))
