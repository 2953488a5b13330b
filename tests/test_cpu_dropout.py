"""`model.cpu_dropout: packed`: the masks' law, the gradient, seeding, and the attention swap."""

import math

import pytest
import torch
from torch import nn

from tests.helpers import make_tiny_encoder_dir
from trainer import cpu_dropout
from trainer.config import ModelConfig, from_dict
from trainer.config import ConfigError
from trainer.model import build_encoder


def _binomial_slack(n: int, p: float) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma: a false failure about once in 3.5 million runs


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_per_lane_and_unbiased_scale(p):
    """Each of the four 16-bit lanes of a 64-bit draw drops with probability p (a 63-bit draw, as
    `random_()` without bounds gives, would never drop in one lane); kept values are scaled to keep the mean."""
    torch.manual_seed(0)
    x = torch.ones(4 * 50_000, dtype=torch.float64)
    out = cpu_dropout.packed_dropout(x, p)
    p_eff = round(p * 65536) / 65536
    dropped = (out == 0).view(-1, 4).double()
    for lane in range(4):
        assert abs(dropped[:, lane].mean().item() - p) < _binomial_slack(50_000, p), lane
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p_eff)), rtol=0, atol=0)
    assert abs(out.mean().item() - 1) < _binomial_slack(out.numel(), p) / (1 - p)


def test_gradient_is_the_mask_times_the_scale_and_dtype_kept():
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 33, 5, dtype=dtype, requires_grad=True)  # odd size: a partial last 64-bit draw
        out = cpu_dropout.packed_dropout(x, 0.3)
        assert out.dtype == dtype and out.shape == x.shape
        out.backward(torch.ones_like(out))
        scale = torch.tensor(65536 / (65536 - round(0.3 * 65536)), dtype=dtype)
        torch.testing.assert_close(x.grad, (out != 0).to(dtype) * scale, rtol=0, atol=0)


def test_seeded_masks_repeat_and_edges():
    x = torch.ones(1000)
    torch.manual_seed(5)
    a = cpu_dropout.packed_dropout(x, 0.2)
    torch.manual_seed(5)
    assert torch.equal(a, cpu_dropout.packed_dropout(x, 0.2))
    assert not torch.equal(a, cpu_dropout.packed_dropout(x, 0.2))  # the generator moved on
    assert cpu_dropout.packed_dropout(x, 0.0) is x
    assert torch.equal(cpu_dropout.packed_dropout(x, 1.0), torch.zeros_like(x))


def test_module_is_identity_in_eval_and_torch_off_cpu_semantics():
    layer = cpu_dropout.PackedDropout(0.5)
    x = torch.randn(64, 8)
    assert torch.equal(layer.eval()(x), x)
    out = layer.train()(x)
    assert 0 < (out == 0).float().mean().item() < 1
    assert isinstance(layer, nn.Dropout) and layer.p == 0.5


def _attention_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, 9, 8, generator=g) for _ in range(3))
    lengths = torch.tensor([9, 5, 1])
    mask = (torch.arange(9)[None, :] < lengths[:, None])[:, None, None, :].expand(3, 1, 9, 9)
    return q, k, v, mask


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_attention_formula_equals_sdpa_when_nothing_drops(dtype, tol):
    """With p below 2^-17 no element drops, so the eager branch must reproduce SDPA (scale, padding mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = (t.to(dtype) if t.is_floating_point() else t for t in _attention_inputs())
    module = nn.Module().train()
    module.is_causal = False
    ours, _ = cpu_dropout._attention(module, q, k, v, mask, scaling=0.3, dropout=1e-7)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, dropout=0.0)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_attention_drops_probabilities_with_the_packed_mask():
    q, k, v, mask = _attention_inputs(1)
    module = nn.Module().train()
    module.is_causal = False
    torch.manual_seed(3)
    ours, weights = cpu_dropout._attention(module, q, k, v, mask, scaling=0.25, dropout=0.2)
    probs = torch.softmax((q @ k.transpose(2, 3) * 0.25).masked_fill(~mask, torch.finfo(q.dtype).min), dim=-1)
    torch.manual_seed(3)
    dropped = cpu_dropout.packed_dropout(probs, 0.2)
    torch.testing.assert_close(weights, dropped)
    torch.testing.assert_close(ours, (dropped @ v).transpose(1, 2))
    assert (weights == 0).any() and not (probs == 0).all()


def _encoder(tmp_path, **kw):
    return build_encoder(ModelConfig(name_or_path=str(make_tiny_encoder_dir(tmp_path)), pooler="mean", **kw))


def test_install_swaps_dropouts_and_attention_and_eval_is_unchanged(tmp_path):
    packed, stock = _encoder(tmp_path), _encoder(tmp_path, cpu_dropout="torch")
    assert packed.backbone.config._attn_implementation == cpu_dropout.ATTENTION_NAME
    assert stock.backbone.config._attn_implementation == "sdpa"
    assert not any(type(m) is nn.Dropout for m in packed.modules())
    assert any(type(m) is nn.Dropout for m in stock.modules())
    batch = packed.tokenize(["the city of water", "a red house in the old town", "music"])
    packed.eval(), stock.eval()
    with torch.no_grad():
        assert torch.equal(packed(**batch), stock(**batch))  # evaluation runs transformers' own SDPA
    packed.train()
    torch.manual_seed(0)
    a = packed(**batch)
    torch.manual_seed(0)
    assert torch.equal(a, packed(**batch)) and not torch.equal(a, stock(**batch))


def test_no_dropout_training_equals_stock(tmp_path):
    packed, stock = _encoder(tmp_path, dropout=0.0), _encoder(tmp_path, dropout=0.0, cpu_dropout="torch")
    batch = packed.tokenize(["the city of water", "a red house in the old town"])
    packed.train(), stock.train()
    torch.testing.assert_close(packed(**batch), stock(**batch), rtol=0, atol=0)


def test_gradient_checkpointing_replays_packed_masks(tmp_path):
    """Activation checkpointing recomputes each layer with the saved CPU RNG state: the packed masks must replay,
    so the gradients equal those of the plain run."""
    grads = []
    for ckpt in (False, True):
        model = _encoder(tmp_path, gradient_checkpointing=ckpt).train()
        batch = model.tokenize(["the city of water", "a red house in the old town", "music"])
        torch.manual_seed(7)
        model(**batch).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0])


def test_unknown_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="cpu_dropout"):
        from_dict({"model": {"cpu_dropout": "fast"}})


def test_off_cpu_tensors_take_torch_dropout(monkeypatch):
    """GPUs keep torch's fused dropout: a non-CPU tensor (here `meta`, which needs no device) never reaches the
    packed sampler."""
    def refuse(*_):
        raise AssertionError("packed_dropout called for a non-CPU tensor")

    monkeypatch.setattr(cpu_dropout, "packed_dropout", refuse)
    out = cpu_dropout.PackedDropout(0.1).train()(torch.empty(4, 8, device="meta"))
    assert out.device.type == "meta"
