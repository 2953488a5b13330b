"""STS evaluation, SentEval protocol: cosine similarity of L2-normalised embeddings, Spearman x 100.

Tasks and their files under `sts_dir` (SentEval's `data/downstream` layout; a `STS/` level is optional):
- `sts12`..`sts16`: `STS12-en-test/STS.input.<set>.txt` (two tab-separated sentences a line) beside
  `STS.gs.<set>.txt` (one gold score a line; an empty gold line means the pair is skipped). Any folder named
  `STS12*` is accepted, so an excerpt folder works too.
- `stsb_dev`, `stsb_test`: `STSBenchmark/sts-{dev,test}.csv`, split on TABS (score = column 5, sentences = 6, 7).
- `sickr_trial`, `sickr_test`: `SICK/SICK_{trial,test_annotated|test}.txt` (header row; relatedness column).

Aggregation for STS12-16 (several sets a year): "all" (default, SimCSE's setting) is ONE Spearman over the
concatenated pairs of every set of the year; "wmean" is the mean of per-set Spearmans weighted by pair count.

Files are read strictly: a short line, a score that is not a finite number, or a gold file whose line count
differs from its input file is a UserError naming `file:line`; so are gold scores that are all equal (Spearman
is undefined, every score would be nan and no best model could ever be kept). Blank lines are skipped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from trainer.errors import UserError
from trainer.progress import bar_switch

log = logging.getLogger(__name__)
STS_YEARS = ("sts12", "sts13", "sts14", "sts15", "sts16")
TASKS = STS_YEARS + ("stsb_dev", "stsb_test", "sickr_trial", "sickr_test")


@dataclass
class PairSet:
    """One file's sentence pairs with gold scores."""

    name: str
    left: list[str]
    right: list[str]
    gold: np.ndarray


# ----------------------------------------------------------------------------------------------------------
# Readers


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines: an editor's, not a pair
        lines.pop()
    return lines


def _score(text: str, path: Path, line_number: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{path}:{line_number}: score {text.strip()!r} is not a number")
    return value


def _columns(line: str, count: int, path: Path, line_number: int, what: str) -> list[str]:
    cols = line.split("\t")
    if len(cols) < count:
        raise UserError(f"{path}:{line_number}: expected {what}, got {len(cols)} column(s)")
    return cols


def _pair_set(name: str, path: Path, left: list[str], right: list[str], gold: list[float]) -> PairSet:
    """The set, once its gold scores can rank anything: Spearman against constant scores is undefined."""
    if len(set(gold)) < 2:
        shown = f"are {gold[0]}" if gold else "are missing"
        raise UserError(f"{path}: all {len(gold)} gold scores {shown}: Spearman correlation is undefined "
                        "(wrong score column, or not an STS file?)")
    return PairSet(name, left, right, np.asarray(gold))


def _senteval_sets(folder: Path) -> list[PairSet]:
    sets = []
    for inp in sorted(folder.glob("STS.input.*.txt")):
        name = inp.name[len("STS.input.") : -len(".txt")]
        gs = folder / f"STS.gs.{name}.txt"
        if not gs.is_file():
            log.warning("%s has no gold file %s; skipped", inp, gs.name)
            continue
        pairs, golds = _read_lines(inp), _read_lines(gs)
        if len(pairs) != len(golds):
            raise UserError(f"{gs} has {len(golds)} lines but {inp.name} has {len(pairs)}: pairs and scores "
                            "would not match")
        left, right, gold = [], [], []
        for number, (pair, score) in enumerate(zip(pairs, golds), 1):
            if not score.strip():  # SentEval: an empty gold line means the pair is not scored
                continue
            a, b = _columns(pair, 2, inp, number, "2 tab-separated sentences")[:2]
            left.append(a)
            right.append(b)
            gold.append(_score(score, gs, number))
        sets.append(_pair_set(name, gs, left, right, gold))
    return sets


def _stsb(path: Path) -> list[PairSet]:
    left, right, gold = [], [], []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        cols = _columns(line, 7, path, number, "7 tab-separated columns (score in column 5, sentences 6 and 7)")
        gold.append(_score(cols[4], path, number))
        left.append(cols[5])
        right.append(cols[6])
    return [_pair_set(path.stem, path, left, right, gold)]


def _sick(path: Path) -> list[PairSet]:
    lines = _read_lines(path)
    header = lines[0].split("\t") if lines else []
    for column in ("sentence_A", "sentence_B", "relatedness_score"):
        if column not in header:
            raise UserError(f"{path}:1: no {column!r} column in the header (a SICK file starts with one)")
    ia, ib, iscore = header.index("sentence_A"), header.index("sentence_B"), header.index("relatedness_score")
    need = max(ia, ib, iscore) + 1
    left, right, gold = [], [], []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cols = _columns(line, need, path, number, f"at least {need} tab-separated columns")
        left.append(cols[ia])
        right.append(cols[ib])
        gold.append(_score(cols[iscore], path, number))
    return [_pair_set(path.stem, path, left, right, gold)]


def _find(sts_dir: Path, *candidates: str) -> Optional[Path]:
    for root in (sts_dir, sts_dir / "STS"):
        for pattern in candidates:
            found = sorted(root.glob(pattern))
            if found:
                return found[0]
    return None


def expected_files(task: str) -> str:
    """Where `task`'s files are looked for under `sts_dir` (for messages)."""
    if task in STS_YEARS:
        return f"STS{task[3:]}-en-test/STS.input.*.txt + STS.gs.*.txt"
    if task.startswith("stsb_"):
        return f"STSBenchmark/sts-{task[5:]}.csv"
    return f"SICK/SICK_{task[6:]}_annotated.txt (or SICK_{task[6:]}.txt)"


def load_task(sts_dir: str | Path, task: str) -> Optional[list[PairSet]]:
    """The pair sets of `task`, or None when its files are not under `sts_dir`; UserError (naming the file and
    line) for a malformed file or constant gold scores."""
    sts_dir = Path(sts_dir)
    if task in STS_YEARS:
        folder = _find(sts_dir, f"STS{task[3:]}-en-test", f"STS{task[3:]}*")
        sets = _senteval_sets(folder) if folder and folder.is_dir() else []
        return sets or None
    if task.startswith("stsb_"):
        path = _find(sts_dir, f"STSBenchmark/sts-{task[5:]}.csv")
        return _stsb(path) if path else None
    if task.startswith("sickr_"):
        split = task[6:]
        path = _find(sts_dir, f"SICK/SICK_{split}_annotated.txt", f"SICK/SICK_{split}.txt")
        return _sick(path) if path else None
    raise UserError(f"unknown STS task {task!r}; choose from {', '.join(TASKS)}")


# ----------------------------------------------------------------------------------------------------------
# Scoring


def spearman100(pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(pred, gold).correlation * 100.0)


def _cosine(model, left: list[str], right: list[str], cache: dict, batch_size: int, progress: bool) -> np.ndarray:
    missing = list(dict.fromkeys(s for s in left + right if s not in cache))
    from tqdm.auto import tqdm

    # Chunks of a few batches give a progress bar without asking the encoder for one (any `.encode` works).
    chunk = batch_size * 8
    for start in tqdm(range(0, len(missing), chunk), desc="encode", **bar_switch(progress), leave=False):
        part = missing[start : start + chunk]
        emb = model.encode(part, batch_size=batch_size)
        emb = np.asarray(emb.float().numpy() if hasattr(emb, "numpy") else emb, dtype=np.float64)
        # Normalise again in float64: cosine must not depend on the encoder's own normalisation.
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
        cache.update(zip(part, emb))
    a = np.stack([cache[s] for s in left])
    b = np.stack([cache[s] for s in right])
    return (a * b).sum(1)


def score_sets(sets: list[PairSet], sims: list[np.ndarray], aggregation: str = "all") -> float:
    """Spearman x100 of a task: one correlation over all pairs ("all") or the pair-weighted mean ("wmean")."""
    if aggregation == "all":
        return spearman100(np.concatenate(sims), np.concatenate([s.gold for s in sets]))
    if aggregation == "wmean":
        sizes = np.array([len(s.gold) for s in sets], dtype=np.float64)
        scores = np.array([spearman100(p, s.gold) for p, s in zip(sims, sets)])
        return float((scores * sizes).sum() / sizes.sum())
    raise UserError(f"aggregation must be 'all' or 'wmean', got {aggregation!r}")


def _load_model(model_or_path, pooling: Optional[str]):
    if not isinstance(model_or_path, (str, Path)) and hasattr(model_or_path, "encode"):
        return model_or_path
    from trainer.model import SentenceEncoder

    return SentenceEncoder.load(model_or_path, pooler=pooling)


def evaluate_sts(
    model_or_path,
    sts_dir: str | Path,
    *,
    tasks: Optional[Sequence[str]] = None,
    pooling: Optional[str] = None,
    batch_size: int = 128,
    progress: bool = True,
    aggregation: str = "all",
) -> dict[str, float]:
    """Spearman x100 per task. `model_or_path`: a `SentenceEncoder` (anything with `.encode`), a checkpoint or
    export folder, or an HF name. Tasks whose files are missing are reported and left out of the result; when
    none of the tasks is found it is a UserError naming the files looked for."""
    sts_dir = Path(sts_dir)
    if not sts_dir.is_dir():
        raise UserError(f"STS folder not found: {sts_dir}")
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown STS task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    found = {task: load_task(sts_dir, task) for task in tasks}  # every file checked before any encoding
    if not any(found.values()):
        if len(tasks) == len(TASKS):
            raise UserError(f"no STS task files under {sts_dir} (SentEval layout: STSBenchmark/, SICK/, STS12-en-test/ ...)")
        wanted = "; ".join(f"{task}: {expected_files(task)}" for task in tasks)
        raise UserError(f"no STS files under {sts_dir} (nor {sts_dir / 'STS'}) for {wanted}")
    model = _load_model(model_or_path, pooling)
    results: dict[str, float] = {}
    cache: dict = {}
    for task, sets in found.items():
        if not sets:
            log.warning("STS task %s: no %s under %s; skipped", task, expected_files(task), sts_dir)
            continue
        sims = [_cosine(model, s.left, s.right, cache, batch_size, progress) for s in sets]
        results[task] = score_sets(sets, sims, aggregation if task in STS_YEARS else "all")
    return results


def format_table(results: dict[str, float]) -> str:
    rows = list(results.items())
    if len(rows) > 1:
        rows.append(("avg", float(np.mean(list(results.values())))))
    width = max([len(k) for k, _ in rows] + [4])
    lines = [f"| {'task':<{width}} | Spearman x100 |", f"|{'-' * (width + 2)}|---------------|"]
    lines += [f"| {k:<{width}} | {v:13.2f} |" for k, v in rows]
    return "\n".join(lines)
