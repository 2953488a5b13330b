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
from typing import Any

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
    scheduler: torch.optim.lr_scheduler.LambdaLR
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`optim.scheduler` over `optim.max_steps` optimizer steps, HF Trainer's curves (`transformers.get_scheduler`):
    the LR of optimizer step k (from 1) is lr * f(k - 1), so warmup starts from 0 as HF's does."""
    from transformers import get_scheduler

    extra = {"num_decay_steps": cfg.num_decay_steps()} if cfg.scheduler == "warmup_stable_decay" else None
    return get_scheduler(_SCHEDULERS[cfg.scheduler], optimizer, num_warmup_steps=cfg.num_warmup_steps(),
                         num_training_steps=cfg.max_steps, scheduler_specific_kwargs=extra)


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
    return torch.optim.AdamW(groups, lr=cfg.lr)


def prepare(accelerator: Any, model: torch.nn.Module, cfg: TrainConfig) -> Prepared:
    """Optimizer and schedule for `model`, DeepSpeed's missing values, then `accelerator.prepare`."""
    optimizer = build_optimizer(model, cfg.optim)
    # The scheduler is stepped by hand once per optimizer step: Accelerate's prepared scheduler steps
    # num_processes times per call, which would end the schedule W times too early.
    scheduler = build_scheduler(optimizer, cfg.optim)
    # DeepSpeed: micro batch from data.batch_size (no DataLoader is prepared), clipping = optim.max_grad_norm.
    dist.configure_deepspeed(accelerator, micro_batch_size=cfg.data.batch_size, max_grad_norm=cfg.optim.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Prepared(model=model, unwrapped=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler)
