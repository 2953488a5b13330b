"""Resumable checkpoints and the kept best model, written so that a crash never leaves a half-written one.

Layout under `<output_dir>`:
- `checkpoints/step_XXXXXXXX/` holds `state/` (Accelerate: model, optimizer, every rank's RNG, ZeRO shards),
  `model/` (a `SentenceEncoder.save` folder), `objective.pt` (the queue), `scheduler.json` (the LR schedule)
  and `contrastive_state.json` (a `TrainState`: step, best and initial score, MLflow run id, data position; plus
  `files`, the size of every other file; not named like HF Trainer's `trainer_state.json`, whose schema
  differs). It is written as `.tmp_step_XXXXXXXX/` and renamed when complete; only folders holding the state
  file count (checkpoints of older versions, which named it `trainer_state.json`, still do and resume), and the
  newest `checkpoint_keep` are kept.
- `best/` is the model with the best STS-B dev score (`step.txt` says which step), replaced atomically.

Every method is called on every rank: they hold the barriers that keep ranks in step; rank 0 alone writes
the shared files (under ZeRO-3 every rank first joins the gather of the partitioned weights it writes).

Nothing of a checkpoint is unpickled with full pickle: the scheduler is saved as JSON (Accelerate would pickle a
registered object and load it with `weights_only=False`), and `resume_point` checks every file with
`trainer.checkpoint_files.verify_checkpoint` before Accelerate or DeepSpeed opens any. Whatever then fails to
load, including an RNG state Accelerate would skip with an INFO line, is an error naming the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from trainer.checkpoint_files import (  # noqa: F401 - the state file names are part of this module's surface
    LEGACY_STATE_FILE,
    STATE_FILE,
    file_sizes,
    load_restricted,
    state_file,
    verify_checkpoint,
)
from trainer.distributed import gathered_parameters, whole_model_io
from trainer.errors import UserError
from trainer.files import follow_umask
from trainer.outputs import writing

log = logging.getLogger(__name__)
SCHEDULER_FILE = "scheduler.json"


@dataclass
class TrainState:
    """The loop's own state, saved as `contrastive_state.json` beside Accelerate's state."""

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

    def to_json(self, **extra: Any) -> str:
        return json.dumps({**dataclasses.asdict(self), **extra}, indent=2)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and state_file(p) is not None)


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

    def __init__(self, output_dir: str | Path, accelerator: Any, *, keep: int = 2) -> None:
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
        """The checkpoint to continue from (`resume=True`: the last one; a path: that one), verified file by file,
        or None for a fresh run. A fresh run refuses an output_dir that already holds checkpoints."""
        if resume:
            path = Path(resume) if isinstance(resume, (str, Path)) else self.find_last()
            if path is None or state_file(path) is None:
                raise UserError(f"--resume: no complete checkpoint found in {self.root}")
            with self._naming(path):
                verify_checkpoint(path)
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

    def save(self, state: TrainState, *, model: Any, objective: Any, stream: Any, scheduler: Any) -> None:
        """Checkpoint at `state.step`; `model` is the unwrapped `SentenceEncoder`."""
        tmp, final = self.root / f".tmp_{_name(state.step)}", self.root / _name(state.step)
        with writing("checkpoint", tmp):
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp / "state"))
            # Every rank writes its own RNG state (and ZeRO shards) into tmp; save_state ends without a barrier,
            # so rank 0 must not seal tmp until all of them are done (a slow rank 1 then found its folder gone).
            self.accelerator.wait_for_everyone()
            self._save_model(model, tmp / "model")
            if self.main:
                torch.save(objective.state_dict(), tmp / "objective.pt")
                (tmp / SCHEDULER_FILE).write_text(json.dumps(_scheduler_state(scheduler)))
                # written last: its presence marks the checkpoint complete, its file list covers the rest
                state = dataclasses.replace(state, data=stream.state_dict())
                (tmp / STATE_FILE).write_text(state.to_json(files=file_sizes(tmp)))
                follow_umask(tmp)  # Accelerate's model.safetensors comes out 0600 whatever the umask
                atomic_replace_dir(tmp, final)
                for old in list_checkpoints(self.output_dir)[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load(self, path: Path, *, objective: Any, stream: Any, scheduler: Any) -> TrainState:
        """Restore Accelerate's state, the schedule, the queue and the stream position from `path` (checked by
        `resume_point`); returns its TrainState."""
        state_dir = path / "state"
        with self._naming(path):
            with _without_custom_objects(state_dir) as accelerate_dir:
                self.accelerator.load_state(str(accelerate_dir))
            self._check_rng_restored(state_dir)
            scheduler.load_state_dict(_read_scheduler(path))
            state = TrainState.from_json(state_file(path).read_text())
            stream.load_state_dict(state.data)
            objective_file = path / "objective.pt"
            if objective_file.is_file():
                objective.load_state_dict(load_restricted(objective_file))
        log.info("resumed from %s at step %d", path, state.step)
        return state

    @contextlib.contextmanager
    def _naming(self, path: Path) -> Iterator[None]:
        """Any failure to load `path` becomes one line naming it, with the earlier checkpoint to fall back to."""
        earlier = [p for p in list_checkpoints(self.output_dir) if p.name < path.name]
        hint = f"; resume from the checkpoint before it with --resume {earlier[-1]}" if earlier else ""
        try:
            yield
        except UserError as exc:
            if not hint:
                raise
            raise UserError(f"{exc}{hint}") from exc
        except Exception as exc:  # noqa: BLE001 - a checkpoint that does not load is the user's to fix
            reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise UserError(f"cannot load checkpoint {path}: {reason[:300]}{hint}") from exc

    def _check_rng_restored(self, state_dir: Path) -> None:
        # Accelerate swallows a failed RNG load with an INFO line: the run would go on with other dropout
        # masks. Its file was verified; here we check that it was applied.
        rank = self.accelerator.process_index
        rng_file = state_dir / f"random_states_{rank}.pkl"
        if not rng_file.is_file():  # not listed either (verify_checkpoint checks the list): fewer processes
            log.warning("%s has no RNG state for rank %d (written by fewer processes): it starts a fresh one",
                        state_dir, rank)
            return
        saved = load_restricted(rng_file)
        restored = isinstance(saved, dict) and torch.is_tensor(saved.get("torch_manual_seed"))
        restored = restored and torch.equal(torch.get_rng_state(), saved["torch_manual_seed"])
        if restored and torch.cuda.is_available() and "torch_cuda_manual_seed" in saved:
            now = torch.cuda.get_rng_state_all()
            restored = all(torch.equal(a, b) for a, b in zip(now, saved["torch_cuda_manual_seed"]))
        if not restored:
            raise UserError(f"checkpoint file {rng_file} does not hold a usable RNG state (it was not restored)")

    def save_best(self, step: int, model: Any) -> None:
        """Replace `best/` with `model` (the unwrapped `SentenceEncoder`) of step `step`."""
        tmp = self.output_dir / ".best.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        with writing("the best model", tmp):
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


def _scheduler_state(scheduler: Any) -> dict:
    # plain numbers: LambdaLR stores its lambdas as None (plain functions, rebuilt from the config on resume)
    return scheduler.state_dict()


def _read_scheduler(path: Path) -> dict:
    """The schedule's state: `scheduler.json`, or the pickled `state/custom_checkpoint_0.pkl` of a checkpoint
    written before it existed, read with the restricted unpickler."""
    if (path / SCHEDULER_FILE).is_file():
        return json.loads((path / SCHEDULER_FILE).read_text())
    legacy = path / "state" / "custom_checkpoint_0.pkl"
    if legacy.is_file():
        return load_restricted(legacy)
    raise UserError(f"checkpoint {path} holds no LR schedule ({SCHEDULER_FILE})")


@contextlib.contextmanager
def _without_custom_objects(state_dir: Path) -> Iterator[Path]:
    """`state_dir`, or for a checkpoint written when the scheduler was registered with Accelerate, a view of it
    without `custom_checkpoint_*.pkl`: Accelerate would unpickle those with full pickle (and refuses a folder
    whose count differs from the registered objects'). The schedule is read by `_read_scheduler` instead."""
    custom = {p.name for p in state_dir.glob("custom_checkpoint_*.pkl")}
    if not custom:
        yield state_dir
        return
    with tempfile.TemporaryDirectory(prefix="trainer-resume-") as view:
        for item in state_dir.iterdir():
            if item.name not in custom:
                (Path(view) / item.name).symlink_to(item.resolve())
        yield Path(view)
