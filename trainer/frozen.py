"""The frozen copy of the initial encoder (``loss.weight_source=frozen``, ``loss.twins_reference=initial``) and
the per-step inputs the objective takes beside the embeddings.

The copy is taken when the model is built, before ``prepare`` and before a resume loads a checkpoint, so it
is the encoder as training starts (after ``model.reinit_layers``; a resumed run rebuilds the same one from the
same seed). It never trains and is not saved.

It runs in EVAL mode (no dropout), a choice with three reasons: its similarities are a deterministic
function of the two sentences (a weight does not change with a dropout draw); it draws nothing from the RNG,
so the trained model's dropout masks are exactly those of a run without it (paired comparisons stay paired);
and the identical twin needs no pass of its own (same text, same embedding), so it encodes each sentence once
(and the fraternal views for IFTCL's innate margin): one no-grad forward of B sentences per step for SoftCSE,
of 2B for IFTCL. The price: its identical-twin similarity is 1, while the trained model's is measured between
two dropout views, so an innate margin d0 = 1 - s0(a, F) sits a little above the dropout-noised d the Twins
term constrains at step 0 (docs/fidelity.md).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn

from trainer import distributed as dist
from trainer.data.augment import unchanged_views
from trainer.losses.guided import FrozenViews

_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class FrozenEncoder:
    """``FrozenEncoder(model)``: a no-grad, eval-mode deep copy; ``embed(batch, ...)`` -> ``FrozenViews``."""

    def __init__(self, model: nn.Module, *, mixed_precision: str = "no") -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.mixed_precision = mixed_precision

    def _autocast(self, device: torch.device):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    @torch.no_grad()
    def _encode(self, batch: dict, prefix: str = "") -> torch.Tensor:
        views = {k: batch[prefix + k] for k in _TOKEN_KEYS if prefix + k in batch}
        device = views["input_ids"].device
        if next(self.model.parameters()).device != device:  # the trained copy moved in `prepare`
            self.model.to(device)
        with self._autocast(device):
            return self.model(**views)

    def embed(self, batch: dict, *, candidates: bool, fraternal: bool) -> FrozenViews:
        """Embeddings of the local sentences, of every rank's sentences (``candidates``: a no-grad gather, a
        collective every rank must join) and of the local fraternal views (``fraternal``)."""
        anchors = self._encode(batch)
        return FrozenViews(anchors, dist.gather_no_grad(anchors) if candidates else None,
                           self._encode(batch, "fraternal_") if fraternal else None)


def attach_frozen(objective: Any, model: nn.Module, mixed_precision: str = "no") -> None:
    """Give ``objective`` its frozen initial encoder when it reads one; call right after the model is built."""
    if getattr(objective, "needs_frozen", False):
        objective.frozen = FrozenEncoder(model, mixed_precision=mixed_precision)


def step_inputs(objective: Any, batch: dict) -> dict[str, Optional[Any]]:
    """The objective's keyword inputs beside the embeddings for this micro-batch: ``frozen`` (FrozenViews) and
    ``fraternal_unchanged`` (B,) bool; empty when the objective needs neither."""
    inputs: dict[str, Any] = {}
    if getattr(objective, "needs_fraternal", False) and "fraternal_input_ids" in batch:
        inputs["fraternal_unchanged"] = unchanged_views(batch)
    if getattr(objective, "needs_frozen", False):
        inputs["frozen"] = objective.frozen.embed(batch, candidates=objective.weight_source == "frozen",
                                                  fraternal=objective.twins_reference == "initial")
    return inputs
