"""Pair corpora (jsonl lines {"anchor", "positive", "negatives"}) for the pair recipes, from public data.

    python data/make_pairs.py sts [--sts-dir DIR] [--output data/stsb_pairs.jsonl]
        STS Benchmark train pairs scored >= 4 (of 5) become (anchor, positive) pairs; hard negatives come from
        the pairs scored <= 1: the anchor's own low-score partners when it has some, then the partner of the
        low-score sentence (same source file) that shares the most words with the anchor: a sentence judged
        unrelated to a look-alike of the anchor. Reads `../shared/data/sts` when present, else `data/sts`
        (which lacks the train split).
    python data/make_pairs.py nli --input nli_for_simcse.csv [--output nli_pairs.jsonl]
        SimCSE's supervised NLI triplets (csv columns sent0, sent1, hard_neg: premise, entailment,
        contradiction) -> (anchor, positive, [hard negative]), for launch_configs/runs/sup_simcse_bert_base.yaml.

Deterministic: the same input gives the same file. Shard the output with
`python -m trainer shard --input FILE --output DIR --format pairs`, or name it in `data.train` / `data.sources`
(sharded on the fly).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

HIGH, LOW, MAX_NEGATIVES = 4.0, 1.0, 2
ROOT = Path(__file__).resolve().parents[1]


def _sts_rows(sts_dir: Path) -> list[tuple[str, float, str, str]]:
    path = sts_dir / "STSBenchmark" / "sts-train.csv"
    if not path.is_file():
        sys.exit(f"error: {path} not found (the STS Benchmark train split; pass --sts-dir)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 7:
                rows.append((cols[1], float(cols[4]), cols[5].strip(), cols[6].strip()))
    return rows


def _words(text: str) -> set[str]:
    return {w for w in text.lower().replace(".", " ").replace(",", " ").split() if len(w) > 2}


def sts_pairs(sts_dir: Path) -> list[dict]:
    rows = _sts_rows(sts_dir)
    partners: dict[str, list[str]] = defaultdict(list)  # sentence -> its partners in low-score pairs
    low_by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)  # (sentence, its low-score partner)
    for file, score, s1, s2 in rows:
        if score <= LOW:
            partners[s1].append(s2)
            partners[s2].append(s1)
            low_by_file[file] += [(s1, s2), (s2, s1)]
    out = []
    for file, score, anchor, positive in rows:
        if score < HIGH or anchor == positive:
            continue
        negatives = [n for n in dict.fromkeys(partners[anchor]) if n not in (anchor, positive)][:MAX_NEGATIVES]
        if len(negatives) < MAX_NEGATIVES:
            words = _words(anchor)
            pool = [(s, n) for s, n in low_by_file[file] if n not in (anchor, positive, *negatives)]
            # most shared words first, then the texts: a total order, so the output is deterministic
            best = max(pool, key=lambda sn: (len(words & _words(sn[0])), sn), default=None)
            if best is not None:
                negatives.append(best[1])
        out.append({"anchor": anchor, "positive": positive, "negatives": negatives})
    return out


def nli_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"sent0", "sent1", "hard_neg"} <= set(reader.fieldnames or ()):
            sys.exit(f"error: {path} needs the columns sent0, sent1, hard_neg (SimCSE's nli_for_simcse.csv)")
        return [{"anchor": r["sent0"], "positive": r["sent1"], "negatives": [r["hard_neg"]]} for r in reader]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    sts = sub.add_parser("sts", help="STS-B train pairs scored >= 4, negatives from pairs scored <= 1")
    shared = ROOT.parent / "shared" / "data" / "sts"
    sts.add_argument("--sts-dir", type=Path, default=shared if shared.is_dir() else ROOT / "data" / "sts")
    sts.add_argument("--output", type=Path, default=ROOT / "data" / "stsb_pairs.jsonl")
    nli = sub.add_parser("nli", help="SimCSE's nli_for_simcse.csv triplets")
    nli.add_argument("--input", type=Path, required=True)
    nli.add_argument("--output", type=Path, default=Path("nli_pairs.jsonl"))
    args = parser.parse_args(argv)
    pairs = sts_pairs(args.sts_dir) if args.kind == "sts" else nli_pairs(args.input)
    with open(args.output, "w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
    num_neg = sum(len(p["negatives"]) for p in pairs)
    print(f"wrote {len(pairs)} pairs ({num_neg} hard negatives) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
