"""model.reinit_layers: K = 0 leaves the pretrained weights untouched; K > 0 re-initialises exactly the top K
transformer layers, with the backbone's own _init_weights, deterministically under the seed."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_encoder_dir
from trainer.config import ConfigError, ModelConfig
from trainer.errors import UserError
from trainer.model import build_encoder
from trainer.reinit import reinit_top_layers


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny 3-layer BERT whose every weight was moved off its init values (biases != 0, LayerNorm != 1)."""
    from transformers import BertModel

    tmp = tmp_path_factory.mktemp("reinit")
    folder = make_tiny_encoder_dir(tmp, layers=3)
    model = BertModel.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 + 0.3)
    model.save_pretrained(folder)
    return folder


def build(folder, k, seed=0):
    torch.manual_seed(seed)
    return build_encoder(ModelConfig(name_or_path=str(folder), reinit_layers=k))


def test_zero_is_the_pretrained_model(pretrained):
    plain = build(pretrained, 0, seed=0).state_dict()
    other_seed = build(pretrained, 0, seed=5).state_dict()
    assert plain.keys() == other_seed.keys()
    assert all(torch.equal(plain[k], other_seed[k]) for k in plain)


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_layers_and_nothing_else(pretrained, k):
    before = build(pretrained, 0).state_dict()
    model = build(pretrained, k, seed=3)
    after = model.state_dict()
    top = tuple(f"backbone.encoder.layer.{i}." for i in range(3 - k, 3))
    for name, value in after.items():
        if name.startswith(top):
            assert not torch.equal(value, before[name]), f"{name} was not re-initialised"
        else:
            assert torch.equal(value, before[name]), f"{name} changed"
    # the backbone's own init: N(0, initializer_range) weights, zero biases, unit LayerNorm
    layer = model.backbone.encoder.layer[2]
    std = model.backbone.config.initializer_range
    assert layer.output.dense.weight.std().item() == pytest.approx(std, rel=0.2)
    assert torch.all(layer.output.dense.bias == 0) and torch.all(layer.output.LayerNorm.weight == 1)
    again = build(pretrained, k, seed=3).state_dict()
    assert all(torch.equal(after[n], again[n]) for n in after)  # fixed by the seed
    assert not torch.equal(build(pretrained, k, seed=4).state_dict()[top[-1] + "output.dense.weight"],
                           after[top[-1] + "output.dense.weight"])


def test_bad_counts(pretrained):
    with pytest.raises(ConfigError, match="reinit_layers"):
        ModelConfig(reinit_layers=-1)
    with pytest.raises(UserError, match=r"\[0, 3\]"):
        build(pretrained, 4)
    with pytest.raises(UserError, match="transformer layers"):
        reinit_top_layers(torch.nn.Linear(2, 2), 1)
