"""Resumable checkpoints and the kept best model, written so that a crash never leaves a half-written one.

Layout under `<output_dir>`:
- `checkpoints/step_XXXXXXXX/` holds `state/` (Accelerate: model, optimizer, scheduler, every rank's RNG,
  ZeRO shards), `model/` (a `SentenceEncoder.save` folder), `objective.pt` (the queue) and
  `trainer_state.json` (a `TrainState`: step, best and initial score, MLflow run id, data position).
  It is written as `.tmp_step_XXXXXXXX/` and renamed when complete; only folders holding
  `trainer_state.json` count, and the newest `KEEP_CHECKPOINTS` are kept.
- `best/` is the model with the best STS-B dev score (`step.txt` says which step), replaced atomically.

Every method is called on every rank: they hold the barriers that keep ranks in step; rank 0 alone writes
the shared files (under ZeRO-3 every rank first joins the gather of the partitioned weights it writes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.distributed import gathered_parameters, whole_model_io
from trainer.errors import UserError

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainState:
    """The loop's own state, saved as `trainer_state.json` beside Accelerate's state."""

    step: int = 0
    """Optimizer steps done."""
    best_score: Optional[float] = None
    """Best STS-B dev score so far (the model in `best/`)."""
    initial_score: Optional[float] = None
    """STS-B dev score before training."""
    run_id: Optional[str] = None
    """MLflow run, reopened on resume."""
    data: Optional[dict] = None
    """Position in the training stream (`TrainStream.state_dict()`), filled when a checkpoint is written."""

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in names})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


def find_last_checkpoint(output_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing any old `final`, by renames only."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


class Checkpointer:
    """Saves and restores one run's checkpoints in `output_dir` for the ranks of `accelerator`."""

    def __init__(self, output_dir: str | Path, accelerator: Any, *, keep: int = KEEP_CHECKPOINTS) -> None:
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.keep = keep

    def find_last(self) -> Optional[Path]:
        return find_last_checkpoint(self.output_dir)

    def kept_model(self) -> Path:
        """The model a finished run ends with: `best/` when one was kept, else the last checkpoint's `model/`."""
        best = self.output_dir / "best"
        return best if best.is_dir() else self.find_last() / "model"

    def resume_point(self, resume: bool | str | Path) -> Optional[Path]:
        """The checkpoint to continue from (`resume=True`: the last one; a path: that one), or None for a fresh
        run. A fresh run refuses an output_dir that already holds checkpoints."""
        if resume:
            path = Path(resume) if isinstance(resume, (str, Path)) else self.find_last()
            if path is None or not (path / STATE_FILE).is_file():
                raise UserError(f"--resume: no complete checkpoint found in {self.root}")
            return path
        if self.main and list_checkpoints(self.output_dir):
            raise UserError(
                f"{self.output_dir} already holds checkpoints; pass --resume to continue that run or choose "
                "another output_dir"
            )
        return None

    def has(self, step: int) -> bool:
        """True when the last checkpoint is the one of `step`."""
        last = self.find_last()
        return last is not None and last.name == _name(step)

    def save(self, state: TrainState, *, model: Any, objective: Any, stream: Any) -> None:
        """Checkpoint at `state.step`; `model` is the unwrapped `SentenceEncoder`."""
        tmp, final = self.root / f".tmp_{_name(state.step)}", self.root / _name(state.step)
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp / "state"))
        # Every rank writes its own RNG state (and ZeRO shards) into tmp; save_state ends without a barrier, so
        # rank 0 must not rename tmp until all of them are done (a slow rank 1 then found its folder gone).
        self.accelerator.wait_for_everyone()
        self._save_model(model, tmp / "model")
        if self.main:
            torch.save(objective.state_dict(), tmp / "objective.pt")
            (tmp / STATE_FILE).write_text(dataclasses.replace(state, data=stream.state_dict()).to_json())
            atomic_replace_dir(tmp, final)
            for old in list_checkpoints(self.output_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load(self, path: Path, *, objective: Any, stream: Any) -> TrainState:
        """Restore Accelerate's state, the queue and the stream position from `path`; returns its TrainState."""
        self.accelerator.load_state(str(path / "state"))
        state = TrainState.from_json((path / STATE_FILE).read_text())
        stream.load_state_dict(state.data)
        objective_file = path / "objective.pt"
        if objective_file.is_file():
            objective.load_state_dict(torch.load(objective_file, map_location="cpu", weights_only=True))
        log.info("resumed from %s at step %d", path, state.step)
        return state

    def save_best(self, step: int, model: Any) -> None:
        """Replace `best/` with `model` (the unwrapped `SentenceEncoder`) of step `step`."""
        tmp = self.output_dir / ".best.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._save_model(model, tmp)
        if self.main:
            (tmp / "step.txt").write_text(str(step))
            atomic_replace_dir(tmp, self.output_dir / "best")
        self.accelerator.wait_for_everyone()

    def _save_model(self, model: Any, folder: Path) -> None:
        """Rank 0 writes `model` (a `SentenceEncoder`) whole; under ZeRO-3 every rank joins the gather."""
        with gathered_parameters(model), whole_model_io():
            if self.main:
                model.save(folder)


def _name(step: int) -> str:
    return f"step_{step:08d}"
