"""`data.fast_tokenizer`: whether the training stream uses the hand-written WordPiece path of
`trainer.data.tokenize` (exact, cached, a few times faster than the Rust tokenizer per batch) or the plain one.

`on` uses it whenever the tokenizer is BERT WordPiece and matches it on the probe sentences; `off` never does.
`auto` keeps it only where the plain tokenizer would bound the step. At start-up each process times the plain
tokenizer on one batch and one no-grad forward of the encoder over that batch's two dropout views, on the
training device; a step costs about three such forwards (backward ~ 2 forwards). Tokenizing in the training
process (`data.num_workers: 0`) adds its whole time to every step; W DataLoader workers tokenize W batches in
parallel with it. The fast path goes on when the plain tokenizer would take more than `SHARE` of a step.
Measured: on CPU a MiniLM step takes seconds and the Rust tokenizer ~3 ms per 64 sentences (off); on an H100
a step takes 25-40 ms, so the same 3-7 ms are 10-30% of it without workers (on).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from trainer.data.tokenize import _PROBES, _HFEncoder

log = logging.getLogger(__name__)

SHARE = 0.05
"""Share of a step above which the plain tokenizer counts as bounding it."""


def resolve_fast_tokenizer(mode: str, model: Any, *, batch_size: int, num_workers: int, device: Any) -> str:
    """`mode` ("auto" | "on" | "off") -> "on" | "off" for this process; `model` is the `SentenceEncoder`
    (moved to `device` for the timing when `auto`)."""
    if mode != "auto":
        return mode
    texts = [_PROBES[i % len(_PROBES)] for i in range(batch_size)]
    plain = _HFEncoder(model.tokenizer, model.max_length)
    tokenize_s = _best(lambda: plain(texts))
    views = {k: torch.from_numpy(v).repeat(2, 1).to(device) for k, v in plain(texts).items()}
    was_training = model.training
    model.to(device).eval()  # eval: no dropout draws, so the timing leaves the RNG streams untouched
    with torch.no_grad():
        forward_s = _best(lambda: model(**views), sync=torch.device(device).type == "cuda")
    model.train(was_training)
    choice, share = decide(tokenize_s, forward_s, num_workers)
    log.info("data.fast_tokenizer=auto -> %s: the plain tokenizer would take %.1f%% of a step (%.1f ms a batch, "
             "step ~%.1f ms, %d DataLoader workers)", choice, 100 * share, 1e3 * tokenize_s, 3e3 * forward_s,
             num_workers)
    return choice


def decide(tokenize_s: float, forward_s: float, num_workers: int) -> tuple[str, float]:
    """The rule of `auto`: ("on" | "off", the plain tokenizer's share of a step), a step taken as 3 forwards and
    the tokenizing shared by the DataLoader workers."""
    share = tokenize_s / (3 * forward_s * max(1, num_workers))
    return ("on" if share > SHARE else "off"), share


def _best(fn: Callable[[], Any], *, sync: bool = False, repeat: int = 2) -> float:
    """Fastest of `repeat` calls in seconds (the first one pays any warm-up)."""
    best = float("inf")
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)
