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

from trainer.losses.guided import FrozenViews
from trainer.losses.iftcl import iftcl_loss
from trainer.losses.infonce import append_queue, infonce_loss
from trainer.losses.metrics import hardest_negative_logs
from trainer.losses.queue import HippocampusQueue
from trainer.losses.softcse import softcse_family_kwargs, softcse_loss

LOSS_NAMES = ("infonce", "softcse", "iftcl")


class ContrastiveObjective:
    """``objective(anchors, candidates, *, positive_index, fraternal=None) -> dict``.

    ``out["loss"]`` is the mean over local rows (with grad); the other entries are detached scalars for
    logging (``queue_len`` included when a queue is configured). With ``queue_size > 0`` the queue's
    entries are extra negatives for every loss (IFTCL's hippocampus queue; for InfoNCE/SoftCSE a
    MoCo-style negative queue).

    ``weight_source="frozen"`` (SoftCSE) and ``twins_reference="initial"`` (IFTCL) read a frozen copy of the
    initial encoder: the caller passes its embeddings of the step's rows as ``frozen`` (``FrozenViews``; the
    engine keeps the encoder in ``self.frozen``, ``trainer/frozen.py``, which the objective never calls).
    ``fraternal_unchanged`` (N,) bool marks rows whose fraternal view has the anchor's tokens: logged, and
    left out of the Twins term with ``exclude_unchanged``. With ``log_mechanisms`` set (the engine sets it for
    logged steps) the call adds the metrics that cost an extra pass over the similarities
    (``hardest_neg_*``, ``queue_fill``; ``trainer/losses/metrics.py``).
    """

    def __init__(self, name: str, *, temperature: float = 0.05, kernel: str = "auto", queue_size: int = 0,
                 softcse: Optional[dict[str, Any]] = None, iftcl: Optional[dict[str, Any]] = None,
                 mask_duplicates: bool = True, weight_source: str = "self", twins_reference: str = "fixed",
                 exclude_unchanged: bool = False) -> None:
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
        if weight_source not in ("self", "frozen") or twins_reference not in ("fixed", "initial"):
            raise ValueError(f"weight_source must be self|frozen and twins_reference fixed|initial, got "
                             f"{weight_source!r}, {twins_reference!r}")
        if weight_source == "frozen" and (name != "softcse" or queue_size):
            raise ValueError("weight_source='frozen' applies to the softcse loss without a queue")
        if twins_reference == "initial" and name != "iftcl":
            raise ValueError("twins_reference='initial' applies to the iftcl loss")
        self.weight_source, self.twins_reference = weight_source, twins_reference
        self.exclude_unchanged = exclude_unchanged
        self.frozen: Any = None
        self.log_mechanisms = False

    @property
    def needs_fraternal(self) -> bool:
        return self.name == "iftcl"

    @property
    def needs_frozen(self) -> bool:
        """Whether each call needs the frozen initial encoder's embeddings (``frozen=FrozenViews``)."""
        return self.weight_source == "frozen" or self.twins_reference == "initial"

    def __call__(self, anchors: Tensor, candidates: Tensor, *, positive_index: Optional[Tensor] = None,
                 fraternal: Optional[Tensor] = None, exclude: Optional[tuple[Tensor, Tensor]] = None,
                 frozen: Optional[FrozenViews] = None,
                 fraternal_unchanged: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``exclude=(row_keys (N, R), col_keys (M,))``: keys of the candidates; queue keys are appended here."""
        if self.needs_frozen and frozen is None:
            raise ValueError("this objective reads the frozen initial encoder: pass frozen=FrozenViews(...)")
        if self.needs_frozen and exclude is not None:
            raise ValueError("loss.weight_source=frozen / loss.twins_reference=initial read sentence batches; "
                             "pair data (exclude keys) is not supported with them yet")
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
        guide = (frozen.anchors, frozen.candidates) if self.weight_source == "frozen" else None
        if self.name == "infonce":
            out = infonce_loss(anchors, candidates, **common, exclude=exclude)
        elif self.name == "softcse":
            out = softcse_loss(anchors, candidates, **common, **self.softcse, exclude=exclude, guide=guide)
        else:
            twins_mask = ~fraternal_unchanged if self.exclude_unchanged and fraternal_unchanged is not None else None
            reference = frozen.innate_margin() if self.twins_reference == "initial" else None
            out = iftcl_loss(anchors, candidates, fraternal, **common, **self.iftcl, twins_mask=twins_mask,
                             reference_margin=reference)
        logs = {k: v.detach() for k, v in out.items() if k not in ("loss", "margin")}  # margin: margin_mean
        if self.name == "iftcl":
            logs["pos_sim"] = logs["identical_sim"]  # the SimCSE positive, comparable across losses
        if fraternal_unchanged is not None:
            logs["fraternal_unchanged_frac"] = fraternal_unchanged.to(torch.float32).mean()
        if self.queue.enabled:
            logs["queue_len"] = anchors.new_tensor(float(len(self.queue)))
        if self.log_mechanisms:
            logs.update(self._mechanism_logs(anchors, append_queue(candidates, queue), positive_index, guide,
                                             exclude))
        return {"loss": out["loss"], **logs}

    def _mechanism_logs(self, anchors: Tensor, columns: Tensor, positive_index: Optional[Tensor],
                        guide, exclude: Optional[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """The metrics that need another pass over the similarities: computed for logged steps only."""
        if positive_index is None:
            positive_index = torch.arange(anchors.shape[0], device=anchors.device)
        softcse = None
        if self.name == "softcse" or self.iftcl.get("contrastive") == "softcse":
            keys = ("mode", "gamma", "tau_min", "tau_max", "normalize_weights", "tau_direction")
            softcse = softcse_family_kwargs(temperature=self.temperature,
                                            **{k: v for k, v in {**self.softcse, **self.iftcl}.items() if k in keys})
        logs = hardest_negative_logs(anchors, columns, positive_index.to(anchors.device), softcse_family=softcse,
                                     temperature=self.temperature, guide=guide, exclude=exclude)
        if self.queue.enabled:
            logs["queue_fill"] = anchors.new_tensor(len(self.queue) / self.queue.size)
        return logs

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
        "tau_direction": cfg.tau_direction,
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
            "fraternal_weight": cfg.fraternal_weight,
            "stop_grad_identical": cfg.twins_stop_grad_identical,
            **(softcse if use_softcse else {}),
        }
    return ContrastiveObjective(cfg.name, temperature=cfg.temperature, kernel=cfg.kernel,
                                queue_size=cfg.queue_size, softcse=softcse if cfg.name == "softcse" else None,
                                iftcl=iftcl, mask_duplicates=cfg.mask_duplicates, weight_source=cfg.weight_source,
                                twins_reference=cfg.twins_reference, exclude_unchanged=cfg.twins_exclude_unchanged)
