"""The public functional ``sim_softmax_lse``: validates once, then dispatches to a backend.

Backends: "triton" (``kernels/triton_op.py``), "chunked" (``kernels/chunked.py``), "reference"
(``kernels/reference.py``); "auto" picks Triton for CUDA tensors when triton imports, else chunked.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .chunked import chunked_lse
from .family import check_exclude, check_family, check_reduction, check_tensors, check_workspace
from .reference import dense_lse

# The one list of backend names (trainer's LossConfig.kernel Literal must list the same; a test checks it).
BACKENDS = ("auto", "triton", "chunked", "reference")

try:
    import triton  # noqa: F401

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    _HAS_TRITON = False

if _HAS_TRITON:
    from .triton_op import triton_lse


def triton_available() -> bool:
    """True when the ``triton`` package imported (the Triton backend exists)."""
    return _HAS_TRITON


def check_backend(backend: str, name: str = "backend") -> str:
    """``backend`` when it is one of BACKENDS; else ValueError naming the argument (``name``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {name} {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def _resolve_backend(backend: str, anchors: Tensor) -> str:
    check_backend(backend)
    if backend == "auto":
        on_gpu = isinstance(anchors, Tensor) and anchors.is_cuda and anchors.dtype != torch.float64
        return "triton" if on_gpu and _HAS_TRITON else "chunked"
    if backend == "triton" and not _HAS_TRITON:
        raise ValueError("backend='triton' requested but triton is not installed")
    return backend


def sim_softmax_lse(anchors: Tensor, candidates: Tensor, *, temperature: float = 0.05,
                    weight_gamma: float = 0.0, tau_min: Optional[float] = None, tau_max: Optional[float] = None,
                    tau_gamma: float = 1.0, positive_index: Optional[Tensor] = None,
                    neg_log_scale: Optional[Tensor] = None, backend: str = "auto", reduction: str = "none",
                    workspace_bytes: Optional[int] = None,
                    exclude: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Per-row ``lse_i = log sum_j w_ij exp(s_ij / tau_ij)`` (N,), differentiable in both inputs.

    See ``kernels/__init__.py`` for the math. ``backend``: "auto" (Triton on CUDA when importable, else
    "chunked"), "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "chunked", "reference". lse is
    float32 (float64 for float64 inputs on the torch backends); input gradients have the input dtype.

    ``exclude=(row_keys, col_keys)`` (integer tensors (N, R) or (N,), and (M,)) leaves column j out of row
    i's sum (w_ij = 0) when ``col_keys[j]`` is one of ``row_keys[i]`` and j is not the row's positive. The
    Triton kernels do not take keys yet: with ``exclude`` the "triton" backend runs the chunked path.
    ``reduction``: "none" (the (N,) lse), "mean" or "sum" (a scalar): with a scalar the Triton backend can
    produce the gradient during the forward (6NMD instead of 8NMD FLOPs, stripes of rows within the
    workspace). ``workspace_bytes`` (None: ``kernels.family.DEFAULT_WORKSPACE_BYTES``, 256 MiB; 0: none)
    bounds the N x M buffer a backend keeps: the chunked backend keeps the logits on CPU when they fit, the
    Triton backend keeps gradient tiles; beyond it both recompute similarity tiles in the backward.
    """
    resolved = _resolve_backend(backend, anchors)
    check_reduction(reduction)
    workspace_bytes = check_workspace(workspace_bytes)
    family = check_family(temperature=temperature, weight_gamma=weight_gamma, tau_min=tau_min,
                          tau_max=tau_max, tau_gamma=tau_gamma)
    if exclude is not None and resolved == "triton":
        resolved = "chunked"
    positive_index, neg_log_scale = check_tensors(anchors, candidates, positive_index, neg_log_scale,
                                                  default_index=resolved != "triton")
    keys = check_exclude(exclude, anchors.shape[0], candidates.shape[0], anchors.device)
    if resolved == "triton":
        return triton_lse(anchors, candidates, family, positive_index, neg_log_scale, reduction=reduction,
                          workspace_bytes=workspace_bytes)
    if resolved == "reference":
        lse_N = dense_lse(anchors, candidates, family, positive_index, neg_log_scale,
                          torch.promote_types(anchors.dtype, torch.float32), keys)
    else:
        lse_N = chunked_lse(anchors, candidates, family, positive_index, neg_log_scale, exclude=keys,
                            workspace_bytes=workspace_bytes)
    return reduce_lse(lse_N, reduction)


def reduce_lse(lse_N: Tensor, reduction: str) -> Tensor:
    """``lse_N`` itself, its mean or its sum."""
    return lse_N if reduction == "none" else lse_N.mean() if reduction == "mean" else lse_N.sum()
