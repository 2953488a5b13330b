"""Progress output: TQDM_DISABLE silences the bars, `train --no-progress` silences everything, and a stream
that is not a terminal gets a log line every N steps instead of one endless carriage-return line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from trainer.progress import StepProgress

ROOT = Path(__file__).resolve().parents[1]

_DRAW = textwrap.dedent("""
    import io
    from tqdm.auto import tqdm
    from trainer.progress import StepProgress, bar_switch

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    steps, other = Terminal(), Terminal()
    bar = StepProgress(10, 0, enabled=True, every=5, stream=steps)
    for step in range(1, 11):
        bar.update(step, 0.5)
    bar.close()
    for _ in tqdm(range(3), file=other, desc="encode", **bar_switch(True)):
        pass
    print(repr(steps.getvalue() + other.getvalue()))
""")


def _draw(**env) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _DRAW], env=environ, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_tqdm_disable_silences_the_bars():
    drawn = _draw()
    assert "train" in drawn and "encode" in drawn
    assert _draw(TQDM_DISABLE="1") == "''"


class _Pipe:
    def __init__(self):
        self.written = []

    def write(self, text):
        self.written.append(text)

    def flush(self):
        pass

    def isatty(self):
        return False


def test_no_terminal_logs_a_line_every_n_steps(caplog):
    pipe = _Pipe()
    with caplog.at_level(logging.INFO, logger="trainer.progress"):
        bar = StepProgress(12, 0, enabled=True, every=5, stream=pipe)
        for step in range(1, 13):
            bar.update(step, 0.25)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.progress"]
    assert [line.split(" (")[0] for line in lines] == ["step 5/12", "step 10/12", "step 12/12"]
    assert "loss 0.2500" in lines[0] and "eta" in lines[0]
    assert pipe.written == []  # no carriage-return bar in the log


def test_off_means_no_bar_and_no_lines(caplog):
    pipe = _Pipe()
    with caplog.at_level(logging.INFO, logger="trainer.progress"):
        bar = StepProgress(4, 0, enabled=False, every=1, stream=pipe)
        for step in range(1, 5):
            bar.update(step, 0.1)
        bar.close()
    assert pipe.written == [] and not caplog.records


def test_cli_no_progress_reaches_train(monkeypatch):
    from trainer import cli, engine

    seen = {}
    monkeypatch.setattr(engine, "train", lambda cfg, **kwargs: seen.update(kwargs))
    assert cli.main(["train", "--no-progress"]) == 0
    assert seen["progress"] is False
    assert cli.main(["train"]) == 0
    assert seen["progress"] is True
