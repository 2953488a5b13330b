"""Dropout on CPU from packed random bits (`model.cpu_dropout: packed`).

Why hand-written: torch's CPU dropout draws its mask with `bernoulli_`, one Mersenne-Twister draw per element
(~8.5 ms for one 128 x 32 x 384 activation on this 2-core CPU). Unsupervised SimCSE makes its two views from
dropout, so MiniLM-L6 runs 19 dropouts per forward and `bernoulli_` was 22% of a bf16 training step
(torch.profiler). Here one 64-bit draw gives four 16-bit uniforms, so a mask costs a quarter of the draws
(2.6 ms for the same activation). The drop probability is rounded to a multiple of 2^-16 (0.1 -> 0.100006) and
the kept values are scaled by 1 / (1 - that probability), so the expectation is exact.

BERT-style models compute attention through `scaled_dot_product_attention`, whose CPU path with dropout is the
unfused math path (measured slower than the eager formula). `install` registers an attention function with
Hugging Face's own extension point (`AttentionInterface` + `AttentionMaskInterface`): on CPU in training it is
the eager formula with the packed dropout on the attention probabilities; in evaluation, with no dropout, or
on any other device it IS transformers' SDPA function with SDPA's masks, so evaluation, export and GPU runs
compute exactly what they did. On GPUs torch's dropout (fused, Philox) is kept everywhere.

Masks come from torch's global CPU generator, as torch's dropout's do: seeding, checkpoint RNG state and the
activation-checkpoint / cached-gradient replays of dropout masks work unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "cpu_packed_dropout"
_LEVELS = 1 << 16  # values a 16-bit lane takes


def packed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of `x` (any dtype, CPU), drop probability `p` rounded to a multiple of 2^-16."""
    drop_levels = round(p * _LEVELS)
    if drop_levels == 0:
        return x
    if drop_levels >= _LEVELS:
        return torch.zeros_like(x)
    n = x.numel()
    # random_(int64 min, None) fills all 64 bits; as int16 each lane is uniform on [-2^15, 2^15).
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)[:n]
    keep = lanes.view(x.shape) >= drop_levels - _LEVELS // 2  # P(keep) = 1 - drop_levels / 2^16
    # Multiplying by a 0/1 tensor of x's dtype (not a bool) keeps both passes on the vectorised mul kernels.
    return x.mul(keep.to(x.dtype)).mul_(_LEVELS / (_LEVELS - drop_levels))


class PackedDropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same modes) whose training-mode masks on CPU come from `packed_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu":
            return packed_dropout(x, self.p)
        return super().forward(x)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature; q, k, v are (B, heads, L, d), the mask is SDPA's (bool,
    True = attend, or None when nothing is padded)."""
    # Causal (decoder) attention is not what this encoder trainer trains: leave it to SDPA too.
    if not module.training or dropout == 0.0 or query.device.type != "cpu" or getattr(module, "is_causal", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    weights = packed_dropout(torch.softmax(weights, dim=-1), dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def install(backbone: nn.Module) -> None:
    """Swap every `nn.Dropout` of `backbone` for `PackedDropout` and, where the backbone dispatches attention
    through transformers' interface and uses SDPA, the attention for `_attention` (others keep theirs: e.g.
    MPNet, or a backbone loaded with eager or flash attention)."""
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, PackedDropout(child.p, child.inplace))
    config = getattr(backbone, "config", None)
    if not getattr(backbone, "_supports_attention_backend", False) or getattr(config, "_attn_implementation",
                                                                               None) != "sdpa":
        return
    _register()
    backbone.set_attn_implementation(ATTENTION_NAME)
