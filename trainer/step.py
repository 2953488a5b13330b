"""One micro-batch of training, forward and backward: the plain step and the cached-gradient step.

Plain (`optim.mini_batch_size: 0`): each local sentence is encoded twice in one forward pass (two dropout
masks), view-2 embeddings of every rank are gathered with gradient (`distributed.gather_with_grad`), and the
loss scores local anchors against all candidates with the positive at `rank * B_local + i`; IFTCL adds a
third, token-augmented (fraternal) view. Memory: the encoder's activations for all 2B (3B) rows at once.

Cached (GradCache; sentence-transformers' CachedMultipleNegativesRankingLoss), `mini_batch_size = m`: the
loss is a function of the embeddings only, so the parameter gradient factors as
dL/dtheta = sum_rows dL/de_row * de_row/dtheta, and the two factors can be computed apart:
  (1) encode the same 2B (3B) rows in chunks of m under no_grad, keeping only the (rows, D) embeddings and
      the RNG state before each chunk;
  (2) gather and score the FULL batch exactly as the plain step does (every rank's candidates, the queue),
      on leaf copies of the embeddings, and take dL/de for this rank's rows (the gather's backward brings
      every rank's share home);
  (3) re-encode each chunk WITH grad from its saved RNG state (the same dropout masks, so the same
      embeddings, bit for bit) and backpropagate the cached dL/de through it: the surrogate <e, dL/de> has
      exactly that gradient.
The gradient equals the plain step's; memory holds one chunk's activations plus (rows, D) embeddings and
their gradients, for one extra forward pass per step. DDP: every chunk but the last runs under `no_sync`,
so the gradient all-reduce happens once per step. DeepSpeed: every chunk but the last is a non-boundary
`engine.backward` (ZeRO-1 reduces once, at the boundary; ZeRO-2/3 reduce-scatter after every backward
call, which is how they keep gradients partitioned), and the engine steps after the last chunk.

Both return the objective's loss dict, detached (the loss is the full batch's, for logging), and the gathered
candidates, detached, for `objective.enqueue` once the backward is done.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor

from trainer import distributed as dist
from trainer.errors import UserError

__all__ = ["Backprop", "accelerate_backprop", "cached_step", "forward_backward", "step_loss"]

_VIEW_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Backprop:
    """How a step's backward passes reach the parameters."""

    backward: Callable[[Tensor, bool], None]
    """`backward(loss, last)`: `last` is False for every chunk of a cached step but its last one."""
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext
    """Context around the forward AND backward of every chunk but the last (DDP decides in the forward)."""


PLAIN = Backprop(lambda loss, last: loss.backward())


def accelerate_backprop(accelerator: Any, model: torch.nn.Module) -> Backprop:
    """`accelerator.backward` (loss scaling, grad_accum division); DDP's `no_sync` for non-last chunks;
    under DeepSpeed, `engine.backward` with the accumulation boundary (and its `engine.step`) at the last
    chunk of the last micro-batch only."""
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is not None:
        return Backprop(lambda loss, last: engine.backward(loss, sync_gradients=accelerator.sync_gradients and last))
    return Backprop(lambda loss, last: accelerator.backward(loss), lambda: accelerator.no_sync(model))


def forward_backward(model, batch: dict, objective, rank: int, *, mini_batch_size: int = 0,
                     backprop: Backprop = PLAIN) -> tuple:
    """One micro-batch: loss and backward (plain, or cached in chunks of `mini_batch_size` rows when > 0).
    Returns the loss dict (detached) and the gathered candidates (detached); a pair batch also their text keys
    (`objective.enqueue(*rest)` takes either)."""
    from trainer.pair_step import is_pair_batch, pair_step_loss

    if is_pair_batch(batch):
        if mini_batch_size > 0:
            raise UserError("optim.mini_batch_size (cached gradients) is not supported on pair data yet: set it to 0")
        out, candidates, keys = pair_step_loss(model, batch, objective, rank)
        backprop.backward(out["loss"], True)
        return _detached(out), candidates, keys  # the keys go to the queue beside the candidates
    if mini_batch_size > 0:
        return cached_step(model, batch, objective, rank, mini_batch_size=mini_batch_size, backprop=backprop)
    out, candidates = step_loss(model, batch, objective, rank)
    backprop.backward(out["loss"], True)
    return _detached(out), candidates


def step_loss(model, batch: dict, objective, rank: int) -> tuple[dict, Tensor]:
    """Encode the views, gather candidates across ranks, score this rank's local anchors against them.

    Returns the objective's loss dict (with grad) and the gathered candidates, detached."""
    return _score([model(**inputs) for inputs in _inputs(batch, objective)], objective, rank, batch)


def cached_step(model, batch: dict, objective, rank: int, *, mini_batch_size: int,
                backprop: Backprop = PLAIN) -> tuple[dict, Tensor]:
    """The cached-gradient step (module docstring): the plain step's gradient, one chunk's activations."""
    device = batch["input_ids"].device
    chunks = [_split(inputs, mini_batch_size) for inputs in _inputs(batch, objective)]
    with torch.no_grad():  # (1)
        encoded = [[_encode_saving_rng(model, chunk, device) for chunk in view] for view in chunks]
    leaves = [torch.cat([emb for emb, _ in view]).requires_grad_() for view in encoded]  # (2)
    rngs = [[rng for _, rng in view] for view in encoded]
    del encoded  # the leaves hold the embeddings now
    out, candidates = _score(leaves, objective, rank, batch)
    grads = torch.autograd.grad(out["loss"], leaves)
    replay = [
        (chunk, rng, grad_rows)
        for view, view_rngs, grad in zip(chunks, rngs, grads)
        for chunk, rng, grad_rows in zip(view, view_rngs, grad.split(mini_batch_size))
    ]
    for i, (chunk, rng, grad_rows) in enumerate(replay):  # (3)
        last = i == len(replay) - 1
        with contextlib.nullcontext() if last else backprop.no_sync():
            _set_rng_state(rng, device)
            emb = model(**chunk)
            backprop.backward(torch.dot(emb.flatten(), grad_rows.flatten().to(emb.dtype)), last)
    return _detached(out), candidates


# ----------------------------------------------------------------------------------------------------------


def _view(batch: dict, prefix: str = "") -> dict:
    return {k: batch[prefix + k] for k in _VIEW_KEYS if prefix + k in batch}


def _inputs(batch: dict, objective) -> list[dict]:
    """The encoder inputs of one step: both dropout views in one tensor set (2B rows: the same masks as two
    calls, half the launches), then the fraternal view (B rows) for IFTCL."""
    both = {k: torch.cat([v, v]) for k, v in _view(batch).items()}
    return [both, _view(batch, "fraternal_")] if objective.needs_fraternal else [both]


def _score(embeddings: list[Tensor], objective, rank: int, batch: dict) -> tuple[dict, Tensor]:
    """The loss of one step from the encoded inputs of `_inputs` (in its order); `batch` gives the objective's
    other inputs (the frozen encoder's views, unchanged fraternal rows: `trainer.frozen.step_inputs`)."""
    from trainer.frozen import step_inputs

    num_local = embeddings[0].shape[0] // 2
    anchors, positives = embeddings[0][:num_local], embeddings[0][num_local:]
    candidates = dist.gather_with_grad(positives)
    positive_index = torch.arange(num_local, device=anchors.device) + rank * num_local
    fraternal = dist.gather_with_grad(embeddings[1]) if objective.needs_fraternal else None
    out = objective(anchors, candidates, positive_index=positive_index, fraternal=fraternal,
                    **step_inputs(objective, batch))
    return out, candidates.detach()


def _split(inputs: dict, size: int) -> list[dict]:
    rows = next(iter(inputs.values())).shape[0]
    return [{k: v[start : start + size] for k, v in inputs.items()} for start in range(0, rows, size)]


def _encode_saving_rng(model, chunk: dict, device: torch.device) -> tuple[Tensor, tuple]:
    rng = _rng_state(device)
    return model(**chunk).detach(), rng


def _rng_state(device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """The generators dropout draws from: the CPU one, and the CUDA one of `device` (as torch.utils.checkpoint
    saves them; SDPA's fused dropout takes its Philox seed and offset from the CUDA generator too)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Optional[Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _detached(out: dict) -> dict:
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}
