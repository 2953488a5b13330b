"""The shipped topology files load with Accelerate's own parser and carry the fields the trainer relies on;
`distributed.configure_deepspeed` fills the "auto" values our loop cannot leave to Accelerate."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer import distributed as dist
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ROOT / "launch_configs" / "accelerate"
DS = ROOT / "launch_configs" / "deepspeed"

# name -> (distributed_type, num_processes, num_machines, zero stage or None)
EXPECTED = {
    "cpu_2proc": ("MULTI_GPU", 2, 1, None),  # MULTI_GPU = torchrun; MULTI_CPU would start ONE process
    "single_gpu": ("NO", 1, 1, None),
    "multi_gpu_8": ("MULTI_GPU", 8, 1, None),
    "multi_node_2x8": ("MULTI_GPU", 16, 2, None),
    "deepspeed_zero1": ("DEEPSPEED", 8, 1, 1),
    "deepspeed_zero2": ("DEEPSPEED", 8, 1, 2),
    "deepspeed_zero3": ("DEEPSPEED", 8, 1, 3),
    "cpu_2proc_zero3": ("DEEPSPEED", 2, 1, 3),  # the ZeRO-3 launch the CPU tests run
}


def test_every_shipped_accelerate_config_is_expected():
    assert {p.stem for p in ACCEL.glob("*.yaml")} == set(EXPECTED)
    assert {p.name for p in DS.glob("*.json")} == {"zero1.json", "zero2.json", "zero3.json"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_accelerate_config_loads_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    kind, processes, machines, stage = EXPECTED[name]
    cfg = load_config_from_file(str(ACCEL / f"{name}.yaml"))  # raises on unknown keys
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.distributed_type.value == kind
    assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank) == (processes, machines, 0)
    if machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port and cfg.same_network
    if name == "cpu_2proc":
        assert cfg.use_cpu and cfg.main_process_port == 0  # free port: test launches may overlap
    if stage is None:
        assert not cfg.deepspeed_config
        return
    ds = cfg.deepspeed_config
    # Only keys Accelerate accepts next to a JSON file (anything else is refused at launch).
    assert set(ds) <= {"deepspeed_config_file", "deepspeed_multinode_launcher", "zero3_init_flag"}
    assert ds["deepspeed_multinode_launcher"] == "standard"
    assert cfg.mixed_precision is None, "Accelerate refuses mixed_precision next to a deepspeed_config_file"
    json_path = ROOT / ds["deepspeed_config_file"]  # relative to the repo root, where launches start
    assert json_path == DS / f"zero{stage}.json"
    assert json.loads(json_path.read_text())["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json(stage):
    cfg = json.loads((DS / f"zero{stage}.json").read_text())
    # A torch optimizer is passed in: an optimizer/scheduler block would conflict (and JIT-build fused Adam).
    assert "optimizer" not in cfg and "scheduler" not in cfg
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert cfg[key] == "auto", key
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    # Explicit: Accelerate would fill "auto" with 1.0 whatever optim.max_grad_norm says.
    assert isinstance(cfg["gradient_clipping"], float) and cfg["gradient_clipping"] == 1.0
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    # SentenceEncoder has no `.config`: Accelerate cannot fill the hidden-size based "auto" keys.
    assert "auto" not in json.dumps(zero)
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["zero_allow_untested_optimizer"] is True


def _fake_accelerator(ds_config: dict | None):
    plugin = None if ds_config is None else SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def test_configure_deepspeed_fills_auto_values():
    ds = json.loads((DS / "zero2.json").read_text())
    ds["gradient_clipping"] = "auto"
    dist.configure_deepspeed(_fake_accelerator(ds), micro_batch_size=16, max_grad_norm=0.5)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_clipping"] == 0.5
    dist.configure_deepspeed(_fake_accelerator(None), micro_batch_size=16, max_grad_norm=0.5)  # no DeepSpeed


def test_configure_deepspeed_refuses_conflicting_values():
    ds = json.loads((DS / "zero2.json").read_text())
    with pytest.raises(UserError, match="gradient_clipping=1.0 but optim.max_grad_norm=0.0"):
        dist.configure_deepspeed(_fake_accelerator(ds), micro_batch_size=8, max_grad_norm=0.0)
    ds = {**ds, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=4 but data.batch_size=8"):
        dist.configure_deepspeed(_fake_accelerator(ds), micro_batch_size=8, max_grad_norm=1.0)


def test_configure_deepspeed_accepts_zero3():
    ds = json.loads((DS / "zero3.json").read_text())
    ds["gradient_clipping"] = "auto"
    dist.configure_deepspeed(_fake_accelerator(ds), micro_batch_size=8, max_grad_norm=0.5)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_clipping"] == 0.5


def test_schedule_follows_the_optimizers_current_param_groups():
    """ZeRO-3 rewrites the torch optimizer's param_groups at prepare (2 groups became 1 on CPU); a LambdaLR
    built before then fails at its next step, the hand-set schedule writes into whatever groups exist."""
    import torch

    from trainer.runtime import HandSchedule

    weights, biases = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [weights]}, {"params": [biases], "weight_decay": 0.0}], lr=2.0)
    def fn(step: int) -> float:  # 2 warmup steps from 0, then linear decay to 0 at step 10
        return step / 2 if step < 2 else (10 - step) / 8

    schedule = HandSchedule(optimizer, 2.0, fn)
    assert [g["lr"] for g in optimizer.param_groups] == [2.0 * fn(0)] * 2
    optimizer.param_groups[:] = [{**optimizer.param_groups[0], "params": [weights, biases]}]
    schedule.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == [2.0 * fn(2)] and schedule.get_last_lr() == [2.0 * fn(2)]
    resumed = HandSchedule(optimizer, 2.0, fn)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.last_epoch == 2 and optimizer.param_groups[0]["lr"] == 2.0 * fn(2)
    # a LambdaLR state dict (checkpoints of earlier versions) resumes too
    old = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0), fn)
    old.step()
    resumed.load_state_dict(old.state_dict())
    assert resumed.get_last_lr() == [2.0 * fn(1)]
