"""The Triton backend against the independent float64 formula.

Where the tests run:
- CUDA available: compiled kernels on the GPU (fp32 tight, bf16/fp16 by flash-attention's rule).
- TRITON_INTERPRET=1 in the environment: the interpreter on CPU tensors (shapes <= 64).
- otherwise (plain CPU CI): ``test_interpreter_suite`` re-runs this file in a subprocess with
  TRITON_INTERPRET=1, because the variable must be set before the kernels are decorated (i.e. before
  ``kernels`` is first imported, which another test module may already have done in this process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import sim_softmax_lse_ref  # noqa: E402
from kernels import triton_op  # noqa: E402
from kernels.triton_op import triton_sim_softmax_lse  # noqa: E402
from tests.test_kernels_helpers import (  # noqa: E402
    CASES,
    assert_close_scaled,
    case_kwargs,
    dense_lse_fp64,
    lse_and_grads,
    make_inputs,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = torch.cuda.is_available() and not INTERPRETING
DEVICE = "cuda" if ON_CUDA else "cpu"
RUN_HERE = INTERPRETING or ON_CUDA
needs_kernels = pytest.mark.skipif(not RUN_HERE, reason="runs compiled on CUDA or under TRITON_INTERPRET=1 "
                                                       "(test_interpreter_suite re-runs this file that way)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# odd, non-power-of-2 shapes; the interpreter is slow, so it only gets the small one
SHAPES = [(37, 53, 24)] + ([(130, 300, 72), (257, 700, 384)] if ON_CUDA else [])


@pytest.fixture(autouse=True)
def _no_tf32_and_quiet():
    """fp32 parity needs TF32 off; the interpreter warns about log2(0) = -inf, which is intended."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="divide by zero encountered in log2")
        yield
    torch.backends.cuda.matmul.allow_tf32 = old


# path -> (config, workspace_bytes). Recompute: "fused" (two fused kernels) and "stripe" (G tiles + GEMMs,
# several stripes through a tiny workspace; by columns here since M > N). Keep (kernel v2, tiles from the
# forward): "keep" one column split, "keep_splits3" three splits with headroom 0, so the row reference moves
# at every new max and keep_fixup_kernel has tiles to rescale.
PATHS = {
    "fused": (dict(bwd_mode="fused", keep=False, fwd_flat=False), None),
    "stripe": (dict(bwd_mode="stripe", keep=False, fwd_flat=True), 4096),
    "keep": (dict(keep=True, splits=1), None),
    "keep_splits3": (dict(keep=True, splits=3, keep_headroom=0.0), None),
}


def _run(path, splits=None):
    config, workspace = PATHS[path]
    config = dict(config)
    if splits is not None:
        config["splits"] = splits
    return lambda a, c, **kw: triton_sim_softmax_lse(a, c, config=config, workspace_bytes=workspace, **kw)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path,splits", [("fused", 1), ("stripe", 3), ("keep", None), ("keep_splits3", None)])
def test_triton_fp32_matches_dense_fp64(case, shape, path, splits):
    n, m, d = shape
    a, c = make_inputs(n, m, d, device=DEVICE)
    kwargs = case_kwargs(case, n, m, device=DEVICE)
    grad = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(_run(path, splits), a, c, grad, torch.float32, **kwargs)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=1e-5, atol=1e-5, name=name)


def _reduced(fn, a_ND, c_MD, reduction, dtype, **kwargs):
    """(value, da, dc) of ``fn(..., reduction=reduction) * 3`` on copies in ``dtype`` (3: a non-unit grad)."""
    a = a_ND.detach().to(dtype).requires_grad_(True)
    c = c_MD.detach().to(dtype).requires_grad_(True)
    out = fn(a, c, reduction=reduction, **kwargs)
    da, dc = torch.autograd.grad(out * 3, (a, c))
    return out.detach(), da, dc


def _dense_reduced(a, c, reduction, **kwargs):
    lse = dense_lse_fp64(a, c, **kwargs)
    return lse.mean() if reduction == "mean" else lse.sum()


@needs_kernels
@pytest.mark.parametrize("case", ["infonce", "weight_temp", "perm_nls"])
@pytest.mark.parametrize("reduction,workspace", [("mean", None), ("mean", 4096), ("sum", 4096)],
                         ids=["mean-one-stripe", "mean-stripes", "sum-stripes"])
def test_triton_forward_grad_path(case, reduction, workspace):
    """reduction mean/sum + keep: the gradients come out of the forward (stripes of 16 rows with a 4 KiB
    workspace); the backward only scales them by the incoming grad."""
    n, m, d = SHAPES[0]
    a, c = make_inputs(n, m, d, device=DEVICE)
    kwargs = case_kwargs(case, n, m, device=DEVICE)
    want = _reduced(lambda x, y, reduction, **kw: _dense_reduced(x, y, reduction, **kw), a, c, reduction,
                    torch.float64, **kwargs)
    config = dict(keep=True, keep_headroom=0.0, keep_block_n=16)  # 16-row stripes on the GPU too
    fn = lambda x, y, **kw: triton_sim_softmax_lse(x, y, config=config, workspace_bytes=workspace,  # noqa: E731
                                                   **kw)
    a32 = a.float().requires_grad_(True)
    assert "FwdGrad" in type(fn(a32, c.float(), reduction=reduction, **kwargs).grad_fn).__name__
    got = _reduced(fn, a, c, reduction, torch.float32, **kwargs)
    for name, x, y in zip(("value", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=1e-5, atol=1e-5, name=name)


@needs_kernels
@pytest.mark.parametrize("path", ["stripe", "keep"])
def test_triton_more_rows_than_columns(path):
    """N > M (positives shared): the stripe backward stripes rows (dc summed in fp32), keep is unaffected."""
    n, m, d = 53, 37, 24
    a, c = make_inputs(n, m, d, device=DEVICE, exact_pm1=False)
    kwargs = dict(positive_index=torch.arange(n, device=DEVICE) % m, weight_gamma=1.0, tau_min=0.03, tau_max=0.1)
    grad = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(_run(path), a, c, grad, torch.float32, **kwargs)
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=1e-5, atol=1e-5, name=name)


@needs_kernels
def test_triton_keep_choice_and_workspace_bound():
    """keep=None chooses: keep only where the stripe backward would run (D > 256 on a GPU; forced here via
    bwd_mode) and N x M x itemsize fits the workspace; no keep without gradients; fwdgrad needs a stripe."""
    from kernels.triton_keep import choose_keep
    a, c = make_inputs(37, 53, 24, device=DEVICE)
    a, c = a.float(), c.float()
    cfg = dict(triton_op.default_triton_config(a, c), bwd_mode="stripe")
    need = 37 * 53 * 4
    assert choose_keep(a, c, cfg, "none", need, True) == "keep"
    assert choose_keep(a, c, cfg, "none", need - 1, True) == "recompute"
    assert choose_keep(a, c, cfg, "none", need, False) == "recompute"
    stripe = 53 * 4 * min(cfg["keep_block_n"], 37)  # one stripe: BLOCK_N rows, or all rows when fewer
    assert choose_keep(a, c, cfg, "mean", stripe, True) == "fwdgrad"
    assert choose_keep(a, c, cfg, "mean", stripe - 1, True) == "recompute"
    assert choose_keep(a, c, dict(cfg, bwd_mode="fused"), "none", need, True) == "recompute"
    assert choose_keep(a, c, dict(cfg, keep=False), "none", need, True) == "recompute"
    with torch.no_grad():  # nothing to differentiate: plain forward, no tiles written
        out = triton_sim_softmax_lse(a.requires_grad_(True), c, config=dict(keep=True), reduction="mean")
    assert out.grad_fn is None


@needs_kernels
@pytest.mark.skipif(not ON_CUDA, reason="automatic splits and mode use the GPU's SM count")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_default_config_via_functional(shape):
    n, m, d = shape
    a, c = make_inputs(n, m, d, device=DEVICE)
    kwargs = case_kwargs("weight_temp", n, m, device=DEVICE)
    grad = torch.ones(n, dtype=torch.float64, device=DEVICE)
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(kernels.sim_softmax_lse, a, c, grad, torch.float32, backend="auto", **kwargs)
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=1e-5, atol=1e-5, name=name)


def _torch_same_dtype(a, c, **kwargs):
    """Plain torch in the input dtype (no upcast): the baseline of flash-attention's error rule."""
    return sim_softmax_lse_ref(a, c, upcast=False, **kwargs)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", ["infonce", "weight_temp", "perm_nls"])
@pytest.mark.parametrize("path", list(PATHS))
def test_triton_low_precision_flash_rule(case, shape, dtype, path):
    """err(kernel, fp64 ref) <= 2 * err(torch in the same dtype, fp64 ref) + atol, for lse, da and dc."""
    if INTERPRETING and (case != "weight_temp" or (dtype == torch.bfloat16 and path == "keep_splits3")):
        pytest.skip("interpreter: one low-precision case (tiles are cast to fp32 there anyway)")
    n, m, d = shape
    a, c = make_inputs(n, m, d, device=DEVICE)
    a, c = a.to(dtype), c.to(dtype)  # the fp64 reference sees the same rounded inputs
    kwargs = case_kwargs(case, n, m, device=DEVICE)
    grad = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    base = lse_and_grads(_torch_same_dtype, a, c, grad, dtype, **kwargs)
    got = lse_and_grads(_run(path), a, c, grad, dtype, **kwargs)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, x, b, y in zip(("lse", "da", "dc"), got, base, want):
        scale = y.abs().max().item()
        err_kernel = (x.double() - y).abs().max().item()
        err_torch = (b.double() - y).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-3 * scale, (name, err_kernel, err_torch, scale)


@needs_kernels
def test_triton_only_one_input_requires_grad():
    a, c = make_inputs(20, 33, 16, device=DEVICE)
    a32 = a.float().requires_grad_(True)
    lse = triton_sim_softmax_lse(a32, c.float(), weight_gamma=1.0)
    (da,) = torch.autograd.grad(lse.sum(), (a32,))
    a64 = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(dense_lse_fp64(a64, c, weight_gamma=1.0).sum(), (a64,))
    assert_close_scaled(da, want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_triton_rejects_float64_and_bad_config():
    a, c = make_inputs(8, 9, 4, device=DEVICE)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        kernels.sim_softmax_lse(a, c, backend="triton")
    with pytest.raises(ValueError, match="unknown triton config"):
        triton_sim_softmax_lse(a.float(), c.float(), config=dict(block=3))
    # a host index is range-checked for free (a device index is trusted: checking it would sync)
    with pytest.raises(ValueError, match="out of range"):
        kernels.sim_softmax_lse(a.float(), c.float(), positive_index=torch.full((8,), 9), backend="triton")


@pytest.mark.skipif(RUN_HERE, reason="this process already runs the kernels directly")
def test_interpreter_suite():
    """Plain CPU: run this module under TRITON_INTERPRET=1 in a fresh interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          os.path.abspath(__file__)], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-2000:]
