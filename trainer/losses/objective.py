"""The training objective the engine calls: a configured loss plus its hippocampus queue.

The objective is distribution-agnostic: the engine passes local anchors and candidates already gathered
from every rank (with gradient), then, once backward is done, hands the same gathered candidates (detached)
to `enqueue`, so every rank holds the same queue. The loss dict carries only the loss and its logs.
Duplicate-aware negatives (pair data): `exclude=(row_keys, col_keys)` keys the candidates' texts; the queue
keeps the keys of what it holds, so its columns are keyed too (see `kernels.sim_softmax_lse`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from trainer.losses.iftcl import iftcl_loss
from trainer.losses.infonce import infonce_loss
from trainer.losses.queue import HippocampusQueue
from trainer.losses.softcse import softcse_family_kwargs, softcse_loss

LOSS_NAMES = ("infonce", "softcse", "iftcl")


class ContrastiveObjective:
    """``objective(anchors, candidates, *, positive_index, fraternal=None) -> dict``.

    ``out["loss"]`` is the mean over local rows (with grad); the other entries are detached scalars for
    logging (``queue_len`` included when a queue is configured). With ``queue_size > 0`` the queue's
    entries are extra negatives for every loss (IFTCL's hippocampus queue; for InfoNCE/SoftCSE a
    MoCo-style negative queue).
    """

    def __init__(self, name: str, *, temperature: float = 0.05, kernel: str = "auto", queue_size: int = 0,
                 softcse: Optional[dict[str, Any]] = None, iftcl: Optional[dict[str, Any]] = None,
                 mask_duplicates: bool = True) -> None:
        if name not in LOSS_NAMES:
            raise ValueError(f"loss name must be one of {', '.join(LOSS_NAMES)}, got {name!r}")
        self.name = name
        self.temperature = temperature
        self.kernel = kernel
        self.softcse = dict(softcse or {})
        self.iftcl = dict(iftcl or {})
        self.queue = HippocampusQueue(queue_size)
        self.mask_duplicates = mask_duplicates
        """Whether the pair step leaves candidates that repeat an anchor's texts out of its negatives."""

    @property
    def needs_fraternal(self) -> bool:
        return self.name == "iftcl"

    def __call__(self, anchors: Tensor, candidates: Tensor, *, positive_index: Optional[Tensor] = None,
                 fraternal: Optional[Tensor] = None,
                 exclude: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
        """``exclude=(row_keys (N, R), col_keys (M,))``: keys of the candidates; queue keys are appended here."""
        if self.needs_fraternal and fraternal is None:
            raise ValueError("the iftcl objective needs the fraternal-view embeddings (fraternal=...)")
        if not self.needs_fraternal and fraternal is not None:
            raise ValueError(f"the {self.name} objective takes no fraternal view")
        if exclude is not None and self.needs_fraternal:
            raise ValueError("the iftcl objective takes no exclude keys (it trains on sentences, not pairs)")
        queue = self.queue.negatives()
        if exclude is not None and queue is not None:
            exclude = (exclude[0], torch.cat([exclude[1], self.queue.keys().to(exclude[1].device)]))
        common = dict(temperature=self.temperature, positive_index=positive_index, queue=queue,
                      kernel=self.kernel)
        if self.name == "infonce":
            out = infonce_loss(anchors, candidates, **common, exclude=exclude)
        elif self.name == "softcse":
            out = softcse_loss(anchors, candidates, **common, **self.softcse, exclude=exclude)
        else:
            out = iftcl_loss(anchors, candidates, fraternal, **common, **self.iftcl)
        logs = {k: v.detach() for k, v in out.items() if k != "loss"}
        if self.queue.enabled:
            logs["queue_len"] = anchors.new_tensor(float(len(self.queue)))
        return {"loss": out["loss"], **logs}

    def enqueue(self, candidates: Tensor, keys: Optional[Tensor] = None) -> None:
        """Push the gathered (all ranks) identical-twin candidates of the last call, with their text keys when
        known (pair data); no-op without a queue.

        Call it once that call's backward is done, not inside ``__call__``: enqueue overwrites queue rows in
        place, which a loss that keeps a view of the queue for its backward must not see."""
        self.queue.enqueue(candidates, keys)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "queue" not in state:
            raise ValueError("objective state must be a dict with a 'queue' entry")
        if state.get("name", self.name) != self.name:
            raise ValueError(f"checkpoint objective is {state['name']!r} but loss.name is {self.name!r}")
        self.queue.load_state_dict(state["queue"])


def build_objective(cfg) -> ContrastiveObjective:
    """The objective for a ``trainer.config.LossConfig``; hyper-parameters are validated here, up front."""
    softcse = {
        "mode": cfg.softcse_mode,
        "gamma": cfg.gamma,
        "tau_min": cfg.tau_min,
        "tau_max": cfg.tau_max,
        "normalize_weights": cfg.normalize_weights,
    }
    use_softcse = cfg.name == "softcse" or (cfg.name == "iftcl" and cfg.contrastive == "softcse")
    if use_softcse:
        softcse_family_kwargs(temperature=cfg.temperature, **softcse)  # fail at start-up, not at step 1
    iftcl = None
    if cfg.name == "iftcl":
        iftcl = {
            "contrastive": cfg.contrastive,
            "margin_low": cfg.margin_low,
            "margin_high": cfg.margin_high,
            "twins_weight": cfg.twins_weight,
            **(softcse if use_softcse else {}),
        }
    return ContrastiveObjective(cfg.name, temperature=cfg.temperature, kernel=cfg.kernel,
                                queue_size=cfg.queue_size, softcse=softcse if cfg.name == "softcse" else None,
                                iftcl=iftcl, mask_duplicates=cfg.mask_duplicates)
