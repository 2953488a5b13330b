"""Assets of ``fidelity_experiment.py --smoke``: a tiny random BERT (2 layers, hidden 32) with a word-level
vocabulary, a synthetic corpus and synthetic STS files in SentEval layout (STS-B dev/train, SICK train/trial).
Enough to run the whole pipeline (train, select, held-out evaluation, export, tables, plots) in seconds; the
scores mean nothing."""

from __future__ import annotations

import random
import string
from pathlib import Path

WORDS = ("the a of to and in is was for on that with as by it he she they at from his her their are were be "
         "this which or had has not but one two three new first city year world music film game team war people "
         "state school river house day time man woman children water light red blue green good bad").split()


def _sentence(rng: random.Random, low: int = 4, high: int = 10) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _tiny_model(folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys(specials + list(string.ascii_lowercase + string.digits + string.punctuation)
                               + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS))
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _sts_files(sts: Path, rng: random.Random) -> None:
    (sts / "STSBenchmark").mkdir(parents=True, exist_ok=True)
    (sts / "SICK").mkdir(parents=True, exist_ok=True)
    for split, num in (("dev", 40), ("train", 60)):
        rows = [f"main-captions\tMSRvid\t2012test\t{i:04d}\t{rng.uniform(0, 5):.3f}\t{_sentence(rng)}\t{_sentence(rng)}"
                for i in range(num)]
        (sts / "STSBenchmark" / f"sts-{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for split, num in (("train", 50), ("trial", 30)):
        rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
        rows += [f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.uniform(1, 5):.1f}\tNEUTRAL" for i in range(num)]
        (sts / "SICK" / f"SICK_{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")


def smoke_assets(folder: Path) -> tuple[str, str, str]:
    """(model folder, corpus file, STS folder), written once under ``folder``."""
    model, corpus, sts = folder / "tiny-bert", folder / "corpus.txt", folder / "sts"
    if not (model / "config.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        _tiny_model(model)
    rng = random.Random(0)
    if not corpus.is_file():
        corpus.write_text("\n".join(f"{i} {_sentence(rng)}" for i in range(400)) + "\n", encoding="utf-8")
    if not (sts / "SICK" / "SICK_trial.txt").is_file():
        _sts_files(sts, rng)
    return str(model), str(corpus), str(sts)
