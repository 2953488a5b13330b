"""Fused similarity-softmax kernels for contrastive losses (see ``kernels/sim_softmax.py``)."""

from kernels.sim_softmax import (
    BACKENDS,
    mean_negative_weight,
    sim_softmax_lse,
    sim_softmax_lse_ref,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "mean_negative_weight",
    "sim_softmax_lse",
    "sim_softmax_lse_ref",
    "triton_available",
]
