"""The Accelerate / DeepSpeed set-up of a run: the Accelerator, AdamW, the LR schedule and `prepare`.

`make_accelerator` checks that Accelerate sees the launcher's world; `prepare` builds the optimizer and the
hand-stepped scheduler, fills DeepSpeed's "auto" values and wraps model and optimizer. The scheduler is NOT
registered with `accelerator.register_for_checkpointing`: Accelerate would pickle it and load it back with
`torch.load(weights_only=False)`, so a crafted checkpoint could run code; `trainer.checkpoint` saves it as JSON.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trainer import distributed as dist
from trainer.config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)
# What `accelerate launch --mixed_precision` and the accelerate config file set; Accelerate reads it only when
# `Accelerator(mixed_precision=None)` (PLATFORM.md).
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"


@dataclass
class Prepared:
    """What the loop trains with, after `accelerator.prepare`."""

    model: torch.nn.Module
    """The wrapped model (DDP / DeepSpeed engine): call it in the loop."""
    unwrapped: Any
    """The `SentenceEncoder` inside: evaluate and save it."""
    optimizer: torch.optim.Optimizer
    scheduler: "HandSchedule"
    """Stepped by hand once per optimizer step."""


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for this launch; raises when it does not see the launcher's WORLD_SIZE processes."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    # gloo on CPU; passing a backend to a single process makes Accelerate expect a process group it never starts.
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and expected > 1 else []
    # On CPU, a plain Accelerator() under torchrun thinks the world size is 1 in each process; only `cpu=True`
    # makes it see the launcher's world. A silent single-process run would train on 1/W of the data, so the
    # world size is checked against the launcher's. Under a DeepSpeed launch `cpu=True` would silently drop
    # DeepSpeed (plain DDP): never pass it there.
    dist.skip_deepspeed_cpu_jit_ops()
    accelerator = Accelerator(
        cpu=on_cpu and not dist.deepspeed_requested(),
        mixed_precision=cfg.mixed_precision,  # None: the launcher's choice (Accelerate reads its environment)
        gradient_accumulation_steps=cfg.optim.grad_accum,
        kwargs_handlers=kwargs,
    )
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"Accelerate started {accelerator.num_processes} process(es) but the launcher set WORLD_SIZE={expected}"
        )
    if accelerator.is_main_process:
        log.info("mixed precision %s (from %s)", accelerator.mixed_precision, precision_source(cfg))
    return accelerator


def precision_source(cfg: TrainConfig) -> str:
    """Which setting decides the precision: the run config's value > the launcher's > Accelerate's default."""
    if cfg.mixed_precision is not None:
        return "run config"
    if os.environ.get(LAUNCHER_PRECISION_ENV):
        return f"launcher ({LAUNCHER_PRECISION_ENV})"
    return "default"


# Our names -> transformers' scheduler types; `constant` keeps the warmup (HF's plain "constant" has none).
_SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant_with_warmup",
    "warmup_stable_decay": "warmup_stable_decay",
}


def schedule_factor(cfg: OptimConfig) -> Callable[[int], float]:
    """f(k): the LR multiplier after k optimizer steps for `optim.scheduler`, HF Trainer's curves
    (`transformers.get_scheduler`, read off a one-group probe optimizer): step k + 1 runs at lr * f(k), so
    warmup starts from 0 as HF's does."""
    from transformers import get_scheduler

    extra = {"num_decay_steps": cfg.num_decay_steps()} if cfg.scheduler == "warmup_stable_decay" else None
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(_SCHEDULERS[cfg.scheduler], probe, num_warmup_steps=cfg.num_warmup_steps(),
                         num_training_steps=cfg.max_steps, scheduler_specific_kwargs=extra).lr_lambdas[0]


def build_scheduler(optimizer: Any, cfg: OptimConfig) -> "HandSchedule":
    """`optim.scheduler` over `optim.max_steps` optimizer steps on `optimizer` (the PREPARED one)."""
    return HandSchedule(optimizer, cfg.lr, schedule_factor(cfg))


class HandSchedule:
    """A schedule `lr * f(step)`, written by hand into the PREPARED optimizer's current param groups at every step
    (LambdaLR's interface: `step`, `get_last_lr`, `last_epoch`, `state_dict`).

    Not a LambdaLR on the torch optimizer: DeepSpeed ZeRO-3 rewrites that optimizer's param_groups at
    `prepare` (measured on CPU: AdamW's 2 groups became 1), and LambdaLR, which keeps one base LR per group it
    saw at construction, then fails at its next step. Every group has the same peak LR (they differ in weight
    decay only), so one factor applied to whatever groups exist now is the schedule under every stage."""

    def __init__(self, optimizer: Any, base_lr: float, fn: Callable[[int], float]) -> None:
        self.optimizer, self.base_lr, self.fn = optimizer, base_lr, fn
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        self._last_lr = self.base_lr * self.fn(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self._last_lr

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self._last_lr]

    def state_dict(self) -> dict[str, int]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Also takes a LambdaLR state dict (checkpoints of earlier versions): only `last_epoch` counts."""
        self.last_epoch = int(state["last_epoch"])
        self._apply()


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel over all tensors instead of a Python loop of small ops per tensor; on 2 CPU cores the
    # step of all-MiniLM-L6-v2 (22.7M params) went from 70 ms to 11 ms, 7% of a bf16 training step (same math).
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def prepare(accelerator: Any, model: torch.nn.Module, cfg: TrainConfig) -> Prepared:
    """Optimizer and schedule for `model`, DeepSpeed's missing values, then `accelerator.prepare`."""
    optimizer = build_optimizer(model, cfg.optim)
    # DeepSpeed: micro batch from data.batch_size (no DataLoader is prepared), clipping = optim.max_grad_norm.
    dist.configure_deepspeed(accelerator, micro_batch_size=cfg.data.batch_size, max_grad_norm=cfg.optim.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Stepped by hand once per optimizer step (Accelerate's prepared scheduler steps num_processes times per
    # call, which would end the schedule W times too early), on the prepared optimizer's groups (ZeRO-3).
    scheduler = build_scheduler(optimizer, cfg.optim)
    return Prepared(model=model, unwrapped=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler)
