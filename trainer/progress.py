"""Training progress: a tqdm bar on a terminal, a log line every N steps elsewhere, nothing when asked.

tqdm reads `TQDM_*` environment variables (`TQDM_DISABLE=1`, `TQDM_MININTERVAL=5` ...) as the defaults of the
arguments a caller leaves out, so no bar here passes `disable=` unless progress is off. A bar redrawn with
carriage returns into a log file is one endless line: when the bar's stream (stderr) is not a terminal, the
loop logs `step 40/1000 (4%) loss 0.0123, 1.9 s/step, eta 0:30:24` every `log_every` steps instead.
Only the main process reports; other ranks get no bar at all.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any, Optional

log = logging.getLogger("trainer.progress")


def bar_switch(progress: bool) -> dict[str, Any]:
    """tqdm keyword arguments for an optional bar: `disable=True` when off, nothing otherwise (so that
    `TQDM_DISABLE` and the other TQDM_* variables still apply)."""
    return {} if progress else {"disable": True}


class StepProgress:
    """Progress of the optimizer steps: `update(step, loss)` after each one, `close()` at the end."""

    def __init__(self, total: int, initial: int, *, enabled: bool, every: int, stream: Optional[Any] = None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.every = total, max(1, every)
        self.bar = None
        self.lines = False
        if enabled and _is_terminal(stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=stream)
        elif enabled:
            self.lines = True
        self.start_step, self.t0 = initial, time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        elif self.lines and (step % self.every == 0 or step == self.total):
            per_step = (time.perf_counter() - self.t0) / max(1, step - self.start_step)
            eta = timedelta(seconds=round(per_step * (self.total - step)))
            log.info("step %d/%d (%d%%) loss %.4f, %.2f s/step, eta %s",
                     step, self.total, 100 * step // self.total, loss, per_step, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
