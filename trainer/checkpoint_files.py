"""Every file of a checkpoint is checked before anything loads it: nothing in it may run code, and a file that is
truncated, corrupt, missing or unexpected stops the resume with one line naming it.

Why here and not at each load: Accelerate loads its own files with `torch.load(weights_only=True)`, but DeepSpeed
loads its model and ZeRO files with `weights_only=False`, and a registered custom object would be unpickled with
full pickle too. So before `load_state` runs, every file that anybody might unpickle (a pickle suffix, or
pickle / torch-zip bytes under any name) must load with the restricted unpickler: tensors, plain containers and
numbers, numpy arrays (Accelerate's RNG states), and the four plain-data classes DeepSpeed puts in its ZeRO
files. A full unpickler replaying a stream that the restricted one accepted calls nothing else. JSON files must
parse and safetensors headers must cover their files.

The state file (`contrastive_state.json`) lists every file of the checkpoint with its size (`files`, written when the checkpoint is
sealed), so truncation and tampering show even in files nobody parses (vocab.txt); checkpoints written before
that list existed are checked by content only.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.errors import UserError

STATE_FILE = "contrastive_state.json"
LEGACY_STATE_FILE = "trainer_state.json"  # what versions <= 0.1 wrote (HF Trainer's name, another schema): read, never written


def state_file(checkpoint: Path) -> Optional[Path]:
    """The checkpoint's state file (the legacy name for checkpoints of older versions), or None."""
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        if (checkpoint / name).is_file():
            return checkpoint / name
    return None
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive holding the pickle
_PICKLE_PROTO = 0x80  # the PROTO opcode that starts every binary pickle (protocol >= 2)
# Plain-data classes DeepSpeed pickles into its ZeRO optimizer files (checked with deepspeed 0.19.8): a scaler
# holding a few numbers, an enum and a dataclass of two ints. Resolved only when a file names them.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointFileError(UserError):
    """A checkpoint file that must not or cannot be loaded; `path` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"checkpoint file {path} {problem}")
        self.path = path


# ----------------------------------------------------------------------------------------------------------
# The restricted loader


def _base_globals() -> list:
    # numpy arrays and dtypes (Accelerate's RNG states), exactly the list Accelerate itself allows
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    return list(TORCH_SAFE_GLOBALS)


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _resolve(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _refusal(detail: str) -> str:
    return f"is refused: it holds {detail}, not only tensors and plain data; unpickling it could run code"


def _raw_pickle_globals(path: Path) -> list[str]:
    """The `module.name` references of a plain pickle stream, read without executing it (for the message)."""
    import pickletools

    names, strings = [], []
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name in ("GLOBAL", "INST"):
                    names.append(".".join(str(arg).split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - a broken stream: what was read so far is all there is to say
        pass
    return names


def _unpickler_complaint(exc: Exception, path: Path) -> str:
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return f"a pickled reference to {found.group(1)}"
    known = {_qualified(g) for g in _base_globals()}
    names = [n for n in _raw_pickle_globals(path) if n not in known]
    if names:
        return f"a pickled reference to {names[0]}"
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return f"pickle instructions a tensor file never has ({found.group(1).strip() if found else 'unknown'})"


def is_pickle_file(path: Path) -> bool:
    """Whether anybody might unpickle `path`: a pickle suffix, or pickle / torch-zip bytes under any name."""
    if path.suffix in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTO])


def load_restricted(path: Path, *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with the numpy / DeepSpeed allowlist; CheckpointFileError when the
    file holds anything else (never executed) or does not load. `mmap`: map a torch-zip file's tensors instead
    of reading them (a multi-GB optimizer file is checked in a moment)."""
    base = _base_globals()
    zipped = open(path, "rb").read(4).startswith(_ZIP_MAGIC)
    extra: list = []
    try:
        if zipped:  # name the offending global up front, without unpickling anything
            known = {_qualified(g) for g in base}
            unknown = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if n not in known]
            refused = [n for n in unknown if n not in DEEPSPEED_GLOBALS]
            if refused:
                raise CheckpointFileError(path, _refusal(f"a pickled reference to {refused[0]}"))
            extra = [_resolve(n) for n in unknown]
        with warnings.catch_warnings(), torch.serialization.safe_globals(base + extra):
            warnings.simplefilter("ignore")  # "Detected pickle protocol 5": noise next to the real answer
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except CheckpointFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the loader says, the file is not usable
        if "Weights only load failed" in str(exc) or "WeightsUnpickler" in str(exc):
            raise CheckpointFileError(path, _refusal(_unpickler_complaint(exc, path))) from None
        raise CheckpointFileError(path, f"is corrupt or truncated ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    # the first sentence: torch's zip reader goes on about "an internal miniz error"
    return (lines[0] if lines else type(exc).__name__).split(". ")[0][:200]


# ----------------------------------------------------------------------------------------------------------
# A whole checkpoint


def file_sizes(folder: Path) -> dict[str, int]:
    """`{relative path: bytes}` of every file under `folder` except the state file (which holds it)."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in (STATE_FILE, LEGACY_STATE_FILE)
    }


def read_state(folder: Path) -> dict:
    """The parsed state file of a checkpoint folder."""
    path = state_file(folder) or folder / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFileError(path, "is missing") from None
    except (ValueError, OSError) as exc:
        raise CheckpointFileError(path, f"is corrupt or truncated ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointFileError(path, "is corrupt (not a JSON object)")
    return data


def _check_content(path: Path) -> None:
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise CheckpointFileError(path, f"is corrupt or truncated ({_first_line(exc)})") from None
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:  # checks the header covers exactly the file
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError is not importable by a stable name
            raise CheckpointFileError(path, f"is corrupt or truncated ({_first_line(exc)})") from None
    elif is_pickle_file(path):
        load_restricted(path, mmap=True)


def verify_checkpoint(folder: Path) -> dict:
    """Check every file of a checkpoint folder (see the module doc); returns its parsed state file."""
    state = read_state(folder)
    on_disk = file_sizes(folder)
    for rel in on_disk:
        _check_content(folder / rel)
    written: Optional[dict] = state.get("files")
    if written is None:  # written before the file list existed: content checks only
        return state
    for rel, size in sorted(written.items()):
        if rel not in on_disk:
            raise CheckpointFileError(folder / rel, "is missing")
        if on_disk[rel] != size:
            raise CheckpointFileError(
                folder / rel, f"has {on_disk[rel]} bytes but {size} were written: it was truncated or changed"
            )
    extra = sorted(set(on_disk) - set(written))
    if extra:
        raise CheckpointFileError(folder / extra[0], "was not written by the trainer (remove it)")
    return state
