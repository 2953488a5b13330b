"""Re-initialise the top K transformer layers of a pretrained backbone (``model.reinit_layers``).

A contrastively pretrained encoder such as all-MiniLM-L6-v2 leaves a contrastive objective almost nothing to
do (training loss ~0 from the first step), so losses cannot be told apart on it. Re-initialising its top
layers gives a starting point with headroom while keeping the embeddings and the lower layers.

Each module of the chosen layers goes through the backbone's own ``_init_weights`` (the distribution the
architecture is trained from: for BERT, normal(0, initializer_range) weights, zero biases, unit LayerNorm),
drawing from torch's global RNG, so the result is fixed by the seed set before the model is built.
transformers 5 marks every loaded parameter ``_is_hf_initialized`` and its init functions then do nothing;
the mark is cleared on exactly the re-initialised parameters first.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError


def transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers: the first ModuleList of ``config.num_hidden_layers``
    entries (``encoder.layer`` for BERT/MiniLM/RoBERTa, ``transformer.layer`` for DistilBERT, ``layers``)."""
    num = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num:
            return module
    raise UserError(f"model.reinit_layers: cannot find the {num} transformer layers of "
                    f"{type(backbone).__name__}")


@torch.no_grad()
def reinit_top_layers(backbone: nn.Module, num_layers: int) -> list[str]:
    """Re-initialise the top ``num_layers`` layers in place; returns their parameter-name prefixes."""
    if num_layers == 0:
        return []
    layers = transformer_layers(backbone)
    if not 0 < num_layers <= len(layers):
        raise UserError(f"model.reinit_layers must be in [0, {len(layers)}] for this model, got {num_layers}")
    init_fn = getattr(backbone, "_init_weights", None)
    if init_fn is None:
        raise UserError(f"model.reinit_layers: {type(backbone).__name__} has no _init_weights")
    names = {id(m): name for name, m in backbone.named_modules()}
    chosen = list(layers)[len(layers) - num_layers:]
    for layer in chosen:
        for module in layer.modules():
            module._is_hf_initialized = False
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if hasattr(tensor, "_is_hf_initialized"):
                    tensor._is_hf_initialized = False
            init_fn(module)
    return [names[id(layer)] for layer in chosen]
