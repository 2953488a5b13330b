"""What every backend shares in torch: checks of the op's arguments and the weight/temperature family.

Legend: N rows (anchors), M columns (candidates), B a block of columns (all M for the dense reference).
The math is specified in ``kernels/__init__.py``; the Triton kernels carry the same family in-kernel
(``_family_tile`` in ``kernels/triton_kernels.py``), everything in torch uses ``log_weight_inv_tau``.

Checks are split by cost. Python scalars, shapes, dtypes and devices are checked at every public entry
point: that is free. Tensor VALUES (the range of ``positive_index``) are checked only while they are host
data: reading a device tensor's min/max is a GPU->CPU sync, which would stall every training step, so an
index that already lives on the device is trusted.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor


def check_number(value, name: str, *, minimum: Optional[float] = None, strict: bool = False) -> float:
    """``float(value)`` for a finite real number ``>= minimum`` (``> minimum`` when ``strict``); else ValueError."""
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


# Default bound on the N x M buffer a backend may keep between forward and backward (kept logits on CPU,
# gradient tiles in Triton): 256 MiB, i.e. 8192 x 8192 fp32 or 8192 x 16384 bf16.
DEFAULT_WORKSPACE_BYTES = 256 << 20
REDUCTIONS = ("none", "mean", "sum")


def check_workspace(workspace_bytes) -> int:
    """``DEFAULT_WORKSPACE_BYTES`` for None, else ``int(workspace_bytes)`` (>= 0); else ValueError."""
    if workspace_bytes is None:
        return DEFAULT_WORKSPACE_BYTES
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, numbers.Integral) \
            or workspace_bytes < 0:
        raise ValueError(f"workspace_bytes must be an integer >= 0 (or None), got {workspace_bytes!r}")
    return int(workspace_bytes)


def check_reduction(reduction) -> str:
    """``reduction`` when it is one of REDUCTIONS; else ValueError."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    return reduction


class Family(NamedTuple):
    """Validated hyper-parameters of the family (python floats; ``tau_min is None``: one temperature)."""

    temperature: float
    weight_gamma: float
    tau_min: Optional[float]
    tau_max: Optional[float]
    tau_gamma: float


def check_family(*, temperature, weight_gamma=0.0, tau_min=None, tau_max=None, tau_gamma=1.0) -> Family:
    """Validate the family's python-scalar hyper-parameters once, at a public entry point."""
    temperature = check_number(temperature, "temperature", minimum=0.0, strict=True)
    weight_gamma = check_number(weight_gamma, "weight_gamma", minimum=0.0)
    if (tau_min is None) != (tau_max is None):
        raise ValueError("tau_min and tau_max must be given together (or both None)")
    if tau_min is None:
        return Family(temperature, weight_gamma, None, None, 1.0)  # tau_gamma unused
    return Family(temperature, weight_gamma, check_number(tau_min, "tau_min", minimum=0.0, strict=True),
                  check_number(tau_max, "tau_max", minimum=0.0, strict=True),
                  check_number(tau_gamma, "tau_gamma", minimum=0.0, strict=True))


def is_plain(family: Family, neg_log_scale_N: Optional[Tensor] = None) -> bool:
    """Plain InfoNCE: one temperature, every weight 1 (no positive mask needed anywhere)."""
    return family.tau_min is None and family.weight_gamma == 0 and neg_log_scale_N is None


def _check_pair(anchors, candidates, name: str) -> None:
    if not isinstance(anchors, Tensor) or not isinstance(candidates, Tensor):
        raise ValueError(f"anchors and {name} must be torch.Tensor")
    if anchors.dim() != 2 or candidates.dim() != 2:
        raise ValueError(f"anchors and {name} must be 2-D (N x D, M x D); got shapes "
                         f"{tuple(anchors.shape)} and {tuple(candidates.shape)}")
    (n_rows, dim), (n_cols, dim_c) = anchors.shape, candidates.shape
    if dim != dim_c:
        raise ValueError(f"embedding dim mismatch: anchors have D={dim}, {name} D={dim_c}")
    if n_rows == 0 or n_cols == 0 or dim == 0:
        raise ValueError(f"empty input: N={n_rows} anchors, M={n_cols} {name}, D={dim}")
    if anchors.device != candidates.device:
        raise ValueError(f"anchors on {anchors.device} but {name} on {candidates.device}")
    if anchors.dtype != candidates.dtype:
        raise ValueError(f"dtype mismatch: anchors {anchors.dtype}, {name} {candidates.dtype}")
    if not anchors.dtype.is_floating_point:
        raise ValueError(f"anchors must be floating point, got {anchors.dtype}")


def _check_positive_index(positive_index, n_rows: int, n_cols: int, name: str) -> None:
    if positive_index is None:
        if n_cols < n_rows:
            raise ValueError(f"positive_index defaults to arange(N), which needs M >= N, i.e. at least "
                             f"N={n_rows} {name}; got M={n_cols}")
        return
    if not isinstance(positive_index, Tensor) or positive_index.dtype.is_floating_point \
            or positive_index.dtype == torch.bool:
        raise ValueError("positive_index must be an integer tensor")
    if positive_index.shape != (n_rows,):
        raise ValueError(f"positive_index must have shape (N,)=({n_rows},), got {tuple(positive_index.shape)}")
    if positive_index.device.type == "cpu":  # host data: free to read (a device index is trusted, see above)
        lo, hi = torch.stack(torch.aminmax(positive_index)).tolist()
        if lo < 0 or hi >= n_cols:
            raise ValueError(f"positive_index out of range [0, {n_cols}): min {lo}, max {hi}")


def check_tensors(anchors, candidates, positive_index=None, neg_log_scale=None, *,
                  candidates_name: str = "candidates", default_index: bool = True):
    """Check shapes/dtypes/devices; return (positive_index, neg_log_scale) on the anchors' device.

    positive_index becomes long (``arange(N)`` when None, unless ``default_index=False``: the Triton kernels
    use the row index); neg_log_scale is detached, in promote(dtype, float32).
    """
    _check_pair(anchors, candidates, candidates_name)
    n_rows, n_cols = anchors.shape[0], candidates.shape[0]
    _check_positive_index(positive_index, n_rows, n_cols, candidates_name)
    if positive_index is not None:
        positive_index = positive_index.to(device=anchors.device, dtype=torch.long)
    elif default_index:
        positive_index = torch.arange(n_rows, device=anchors.device)
    if neg_log_scale is not None:
        if not isinstance(neg_log_scale, Tensor) or neg_log_scale.shape != (n_rows,):
            raise ValueError(f"neg_log_scale must be a tensor of shape (N,)=({n_rows},)")
        neg_log_scale = neg_log_scale.detach().to(device=anchors.device,
                                                  dtype=torch.promote_types(anchors.dtype, torch.float32))
    return positive_index, neg_log_scale


class Exclude(NamedTuple):
    """Columns left out of rows' sums, by key: column j is excluded from row i when ``col_keys_M[j]`` equals one
    of ``row_keys_NR[i]``, unless j is the row's positive (which always stays). O(N R + M) int64 instead of an
    N x M mask; the trainer's keys are 64-bit hashes of the input texts (duplicates of a row's own texts)."""

    row_keys_NR: Tensor
    col_keys_M: Tensor


def check_exclude(exclude, n_rows: int, n_cols: int, device: torch.device) -> Optional[Exclude]:
    """``exclude=(row_keys, col_keys)`` checked and moved to ``device`` as int64 (row keys 2-D); None stays None."""
    if exclude is None:
        return None
    if not isinstance(exclude, tuple) or len(exclude) != 2 or not all(isinstance(k, Tensor) for k in exclude):
        raise ValueError("exclude must be a (row_keys, col_keys) pair of integer tensors")
    row_keys, col_keys = exclude
    if any(k.dtype.is_floating_point or k.dtype == torch.bool for k in exclude):
        raise ValueError("exclude keys must be integer tensors")
    if row_keys.dim() == 1:
        row_keys = row_keys[:, None]
    if row_keys.dim() != 2 or row_keys.shape[0] != n_rows or col_keys.shape != (n_cols,):
        raise ValueError(f"exclude keys must have shapes (N, R)=({n_rows}, R) and (M,)=({n_cols},), got "
                         f"{tuple(exclude[0].shape)} and {tuple(col_keys.shape)}")
    return Exclude(row_keys.to(device=device, dtype=torch.long), col_keys.to(device=device, dtype=torch.long))


def excluded_mask(exclude: Exclude, start: int, num_cols: int) -> Tensor:
    """N x B bool: True where column start + b is excluded from row i (before sparing the positive)."""
    cols_1B = exclude.col_keys_M[start:start + num_cols][None, :]
    row_keys_NR = exclude.row_keys_NR
    hit_NB = row_keys_NR[:, :1] == cols_1B
    for r in range(1, row_keys_NR.shape[1]):  # R is tiny (2-3 keys): no N x R x B temporary
        hit_NB |= row_keys_NR[:, r:r + 1] == cols_1B
    return hit_NB


def positive_mask(positive_index_N: Tensor, start: int, num_cols: int) -> Tensor:
    """N x B bool: True at column p(i) of row i, for the columns [start, start + B)."""
    cols_B = torch.arange(start, start + num_cols, device=positive_index_N.device)
    return positive_index_N[:, None] == cols_B[None, :]


def negative_log_weight(sg: Tensor, weight_gamma: float) -> Tensor:
    """log w = gamma * log((1 - s) / 2), IN PLACE on ``sg`` (the clamped stop-gradient similarity).

    At s = 1, log 0 = -inf (gamma > 0): exp gives 0, the term vanishes.
    """
    return sg.neg_().add_(1.0).mul_(0.5).log_().mul_(weight_gamma)


def negative_inv_tau(sg: Tensor, family: Family) -> Tensor:
    """1 / tau with tau = tau_min + (tau_max - tau_min) * ((1 + s) / 2) ** tau_gamma (a new tensor)."""
    tau_delta = family.tau_max - family.tau_min
    return (sg + 1.0).mul_(0.5).pow_(family.tau_gamma).mul_(tau_delta).add_(family.tau_min).reciprocal_()


def log_weight_inv_tau(sim_NB: Tensor, family: Family, positive_index_N: Tensor, start: int = 0,
                       neg_log_scale_N: Optional[Tensor] = None, exclude: Optional[Exclude] = None):
    """(log w, 1/tau) of the similarity tile of columns [start, start + B), positive column fixed to w = 1,
    tau = temperature, ``neg_log_scale`` added to the negatives' log w, excluded columns at log w = -inf.

    log w is None when every weight is 1 and 1/tau a float when it is constant, so the plain InfoNCE case
    costs no N x B temporary. Both come from the clamped stop-gradient similarity (no autograd history) in
    ``sim_NB``'s dtype; in-place arithmetic on fresh temporaries keeps, besides sim, only log w (in the
    clamped copy's storage), 1/tau and the bool positive mask alive.
    """
    inv_temp = 1.0 / family.temperature
    has_tau, has_weight = family.tau_min is not None, family.weight_gamma > 0
    if exclude is not None:
        # w = 0 exactly (log w = -inf): the term leaves the sum and its gradient, as a zero SoftCSE weight does
        log_w_NB, inv_tau = log_weight_inv_tau(sim_NB, family, positive_index_N, start, neg_log_scale_N)
        if log_w_NB is None:
            log_w_NB = torch.zeros_like(sim_NB)
        drop_NB = excluded_mask(exclude, start, sim_NB.shape[1])
        drop_NB &= ~positive_mask(positive_index_N, start, sim_NB.shape[1])
        return log_w_NB.masked_fill(drop_NB, float("-inf")), inv_tau
    if not (has_tau or has_weight or neg_log_scale_N is not None):
        return None, inv_temp
    is_pos_NB = positive_mask(positive_index_N, start, sim_NB.shape[1])
    inv_tau = inv_temp
    log_w_NB = None
    if has_tau or has_weight:
        sg_NB = sim_NB.detach().clamp(-1.0, 1.0)  # a new tensor: the in-place ops never touch sim
        if has_tau:  # first: the log weight below overwrites sg_NB
            inv_tau = negative_inv_tau(sg_NB, family).masked_fill_(is_pos_NB, inv_temp)
        if has_weight:
            log_w_NB = negative_log_weight(sg_NB, family.weight_gamma)
    if neg_log_scale_N is not None:
        nls_N1 = neg_log_scale_N[:, None]
        log_w_NB = nls_N1.expand_as(sim_NB) if log_w_NB is None else log_w_NB.add_(nls_N1)
        return log_w_NB.masked_fill(is_pos_NB, 0.0), inv_tau  # out of place: expand is a view
    if log_w_NB is not None:
        log_w_NB.masked_fill_(is_pos_NB, 0.0)
    return log_w_NB, inv_tau
