"""Everything that touches `torch.distributed` lives here: rank info, gather-with-gradient, reductions.

Layout of the distributed contrastive loss (open_clip / sentence-transformers style): each rank keeps its
B_local anchors and scores them against the candidates of ALL ranks, gathered with `gather_with_grad`, so
anchor i of rank r has its positive at global column `r * B_local + i`. Each rank's loss is the MEAN over its
local rows. Why that gives exactly the single-process gradient on the concatenated batch:
the single-process loss is L = (1/W) sum_r L_r. `all_gather`'s backward sums, onto the owner, the gradients
every rank's L_r' sends to the owner's embeddings, so rank r ends with g_r = d(sum_r' L_r')/d(emb_r) *
d(emb_r)/d(theta); DDP then AVERAGES g_r over ranks: (1/W) sum_r g_r = dL/dtheta. (Summing instead of
averaging, or gathering without gradient, gives the W-times-too-large or lost gradients of pytorch#58005.)
DeepSpeed ZeRO 1-3 average gradients over the data-parallel group the same way, so the argument holds there.
The cached-gradient step (`trainer.step`) takes d loss / d embeddings through the same gather, so it inherits
the contract.

Equal batches are part of that contract: L = (1/W) sum_r L_r is the mean over all rows only when every rank
holds B_local rows, and the positive offset `r * B_local` assumes it too. `gather_with_grad` therefore
all-gathers the shapes first and raises `UnevenBatchError` on every rank (never a hang, never a silently
wrong gradient) instead of padding; `trainer.data.TrainStream` yields equal batches on every rank.

Tested in tests/test_distributed.py: 2 and 3 gloo processes with DDP give, in float64, the parameter
gradients of one process on the concatenated batch for InfoNCE, both SoftCSE modes and IFTCL (+ its queue).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Shapes travel as a fixed-length int64 vector (ndim, d0, d1, ...) so ranks with different ndim still meet
# in one collective of one size; 7 dims is far more than embeddings (2-D) need.
_MAX_DIMS = 7

# torch >= 2.13 renamed the flat-buffer collectives; keep the old names for older torch (setup.py: >= 2.3).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class UnevenBatchError(ValueError):
    """Ranks passed tensors of different shapes to a gather (uneven local batches)."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (RANK from the launcher before the process group exists)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_positive_index(num_local: int, *, device: Optional[torch.device] = None) -> torch.Tensor:
    """Columns of this rank's positives in the gathered candidate list: `rank * num_local + arange(num_local)`."""
    return torch.arange(num_local, device=device) + rank() * num_local


def check_same_shape(x: torch.Tensor, *, what: str = "tensor") -> None:
    """Raise `UnevenBatchError` on EVERY rank when ranks hold tensors of different shapes.

    One tiny all_gather of the shapes (on `x`'s device, so it also works on NCCL); every rank sees all
    shapes and raises the same error, so no rank is left waiting in the next collective.
    """
    if world_size() == 1:
        return
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"{what} has {x.dim()} dims; at most {_MAX_DIMS} are supported")
    mine = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=x.device)
    mine[0] = x.dim()
    mine[1 : x.dim() + 1] = torch.tensor(x.shape, dtype=torch.int64)
    every = torch.empty(world_size() * mine.numel(), dtype=torch.int64, device=x.device)
    _all_gather_flat(every, mine)
    rows = every.view(world_size(), -1).tolist()
    shapes = [tuple(row[1 : row[0] + 1]) for row in rows]
    if any(s != shapes[0] for s in shapes):
        listing = ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(shapes))
        raise UnevenBatchError(
            f"every rank must gather a {what} of the same shape (equal local batch sizes), got {listing}. "
            "Uneven batches would weigh ranks' rows unequally and shift the positive offsets "
            "(rank * B_local); make every rank yield data.batch_size rows (drop or refill the last batch)."
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward, reduce-scatter (SUM) backward: each rank gets the gradient that ALL ranks' losses
    send to its own slice. One flat buffer each way (no W-tensor list + cat)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        _all_gather_flat(out, x)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad_out = grad_out.contiguous()
        grad_x = grad_out.new_empty((grad_out.shape[0] // world_size(), *grad_out.shape[1:]))
        _reduce_scatter_flat(grad_x, grad_out, op=dist.ReduceOp.SUM)
        return grad_x


def gather_with_grad(x: torch.Tensor, *, check_shapes: bool = True) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order along dim 0 (W * B rows); differentiable: the gradient
    w.r.t. each rank's slice, summed over all ranks' losses, returns to its owner.

    With `check_shapes` (default) the shapes are all-gathered first and `UnevenBatchError` is raised on every
    rank when they differ (see the module docstring for why uneven batches are refused, not padded).
    """
    if world_size() == 1:
        return x
    if check_shapes:
        check_same_shape(x, what="batch of embeddings")
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, *, check_shapes: bool = True) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order, without gradient (e.g. to enqueue a shared queue)."""
    if world_size() == 1:
        return x
    if check_shapes:
        check_same_shape(x)
    x = x.contiguous()
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    _all_gather_flat(out, x)
    return out


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a copy; `t` is untouched)."""
    if world_size() == 1:
        return t.clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed through Accelerate (launch_configs/accelerate/deepspeed_zero*.yaml)


def deepspeed_requested() -> bool:
    """True when `accelerate launch` was told to use DeepSpeed (before any Accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def skip_deepspeed_cpu_jit_ops() -> None:
    """On CPU, stop DeepSpeed from JIT-compiling its shared-memory collective op (~40 s on the first
    `init_distributed` of every launch); gloo does the collectives instead. Call before `Accelerator()`."""
    if torch.cuda.is_available() or not deepspeed_requested():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def configure_deepspeed(accelerator: Any, *, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill what Accelerate cannot infer for our loop, before `accelerator.prepare`; no-op without DeepSpeed.

    - `train_micro_batch_size_per_gpu: "auto"` is filled from `data.batch_size` (Accelerate reads it from a
      prepared DataLoader, and the trainer prepares none: `TrainStream` splits ranks itself).
    - DeepSpeed clips gradients itself by its `gradient_clipping` (the trainer's `clip_grad_norm_` only reads
      the norm back), and Accelerate fills "auto" with 1.0 whatever the run says. So "auto" takes
      `optim.max_grad_norm`, and an explicit value must equal it: two different clipping settings for one run
      are refused instead of one being silently ignored.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        if deepspeed_requested():  # e.g. Accelerator(cpu=True) under a DeepSpeed launch: plain DDP instead
            raise RuntimeError("the launcher asked for DeepSpeed but Accelerate did not enable it (cpu=True?)")
        return
    from trainer.errors import UserError

    ds = plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    elif int(micro) != micro_batch_size:
        raise UserError(
            f"{source} sets train_micro_batch_size_per_gpu={micro} but data.batch_size={micro_batch_size}; "
            'set it to "auto" (or make them equal)'
        )
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":
        ds["gradient_clipping"] = float(max_grad_norm)
    elif float(clip) != float(max_grad_norm):
        raise UserError(
            f"{source} sets gradient_clipping={clip} but optim.max_grad_norm={max_grad_norm}; DeepSpeed clips by "
            f"its own value, so make them equal (optim.max_grad_norm={clip}) or set gradient_clipping to \"auto\""
        )


# ZeRO-3 (launch_configs/accelerate/deepspeed_zero3.yaml, cpu_2proc_zero3.yaml): each rank holds 1/W of every
# large parameter between forwards (`stage3_param_persistence_threshold` keeps small ones whole). Forwards
# gather them by themselves (hooks), so evaluation works when EVERY rank runs the same forwards; reading the
# weights to save them does not, and a rank-0-only step must not start one of transformers' ZeRO-3 paths.


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, `module`'s ZeRO-3-partitioned parameters are whole on every rank (read-only; e.g. for
    rank 0 to save them); a no-op without ZeRO-3. A collective: call it on every rank."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@contextlib.contextmanager
def whole_model_io() -> Iterator[None]:
    """Inside the block, transformers loads and saves models whole, as outside DeepSpeed.

    Accelerate registers the DeepSpeed config with transformers for the whole run; under ZeRO-3 every
    `from_pretrained` then builds the model inside `deepspeed.zero.Init` (a collective) and partitions it.
    That hangs when rank 0 alone loads the kept model for the final report, and it is not what the
    launch configs ask for (`zero3_init_flag: false`: build the encoder whole, let `prepare` partition it)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers' module global, restored as it was
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
