"""The chunked torch backend (``kernels/chunked.py``) against the independent float64 formula (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels.chunked import chunked_sim_softmax_lse, default_block_size, keeps_logits
from tests.test_kernels_helpers import (
    CASES,
    assert_close_scaled,
    case_kwargs,
    dense_lse_fp64,
    lse_and_grads,
    make_inputs,
)

N, M, D = 37, 53, 24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (workspace_bytes, block_size): the kept path (default budget; one stripe, or stripes of 5 rows) and the
# recompute path forced by a zero budget (columns per tile 1, 16, auto)
PATHS = {
    "kept": (None, None),
    "kept_stripes5": (None, 5),
    "recompute_block1": (0, 1),
    "recompute_block16": (0, 16),
    "recompute_auto": (0, None),
}


def _path_of(lse):
    return "kept" if "Kept" in type(lse.grad_fn).__name__ else "recompute"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_dense_fp64(case, path, dtype, tol):
    workspace, block_size = PATHS[path]
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs(case, N, M)
    grad = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(chunked_sim_softmax_lse, a, c, grad, dtype, block_size=block_size,
                        workspace_bytes=workspace, **kwargs)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=tol, atol=tol, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_workspace_budget_picks_the_path(dtype):
    """The kept path runs exactly when N x M x itemsize fits the budget (promote(dtype, fp32) itemsize)."""
    a, c = make_inputs(N, M, D)
    a, c = a.to(dtype).requires_grad_(True), c.to(dtype)
    need = N * M * dtype.itemsize
    assert _path_of(chunked_sim_softmax_lse(a, c, workspace_bytes=need)) == "kept"
    assert _path_of(chunked_sim_softmax_lse(a, c, workspace_bytes=need - 1)) == "recompute"
    assert _path_of(chunked_sim_softmax_lse(a, c)) == "kept"  # default budget: 256 MiB
    assert _path_of(kernels.sim_softmax_lse(a, c, backend="chunked", workspace_bytes=0)) == "recompute"
    assert not keeps_logits(a.to("meta"), c.to("meta"), 1 << 40)  # the kept path reads p on the host
    with pytest.raises(ValueError, match="workspace_bytes"):
        kernels.sim_softmax_lse(a, c, workspace_bytes=-1)


@pytest.mark.parametrize("workspace", [None, 0], ids=["kept", "recompute"])
def test_hopeless_positive_rows_are_exact(workspace):
    """tau = 0.01, a positive at s = -1 and a negative at s = +1: p_ip = e^-200 underflows fp32, so the kept
    path cannot read lse off the positive column; those rows are recomputed (lse, da, dc still exact)."""
    a, c = make_inputs(N, M, D, exact_pm1=False)
    c[4], c[5] = -a[4], a[4]  # row 4: positive opposite, a negative identical
    grad = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kwargs = dict(temperature=0.01, weight_gamma=0.5)
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(chunked_sim_softmax_lse, a, c, grad, torch.float32, workspace_bytes=workspace, **kwargs)
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=1e-5, atol=1e-5, name=name)


@pytest.mark.parametrize("workspace", [None, 0], ids=["kept", "recompute"])
@pytest.mark.parametrize("case", ["infonce", "infonce_perm_nls"])
def test_chunked_gradcheck(case, workspace):
    a, c = make_inputs(5, 8, 6, exact_pm1=False)
    kwargs = case_kwargs(case, 5, 8)
    a.requires_grad_(True)
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: chunked_sim_softmax_lse(x, y, temperature=0.5, block_size=3, workspace_bytes=workspace,
                                             **kwargs), (a, c))


@pytest.mark.parametrize("workspace", [None, 0], ids=["kept", "recompute"])
def test_chunked_one_input_requires_grad(workspace):
    a, c = make_inputs(N, M, D)
    for x in (a, c):
        a_, c_ = a.clone(), c.clone()
        (a_ if x is a else c_).requires_grad_(True)
        lse = chunked_sim_softmax_lse(a_, c_, weight_gamma=1.0, block_size=8, workspace_bytes=workspace)
        (got,) = torch.autograd.grad(lse.sum(), (a_ if x is a else c_,))
        a2, c2 = a.clone(), c.clone()
        leaf = (a2 if x is a else c2).requires_grad_(True)
        (want,) = torch.autograd.grad(dense_lse_fp64(a2, c2, weight_gamma=1.0).sum(), (leaf,))
        assert_close_scaled(got, want, rtol=1e-10, atol=1e-10)


def test_kept_backward_twice_with_retain_graph():
    # the kept buffer is read-only in backward: a second backward gives the same gradients
    a, c = make_inputs(N, M, D)
    a.requires_grad_(True)
    lse = chunked_sim_softmax_lse(a, c, tau_min=0.03, tau_max=0.1)
    (g1,) = torch.autograd.grad(lse.sum(), (a,), retain_graph=True)
    (g2,) = torch.autograd.grad(lse.sum(), (a,))
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("workspace", [None, 0], ids=["kept", "recompute"])
def test_chunked_bfloat16_inputs(workspace):
    # low-precision inputs are accumulated in fp32; grads come back in the input dtype
    a, c = make_inputs(N, M, D)
    a16, c16 = a.bfloat16(), c.bfloat16()
    grad = torch.ones(N, dtype=torch.float64)
    lse, da, dc = lse_and_grads(chunked_sim_softmax_lse, a16, c16, grad, torch.bfloat16, weight_gamma=1.0,
                                workspace_bytes=workspace)
    assert lse.dtype == torch.float32 and da.dtype == torch.bfloat16 and dc.dtype == torch.bfloat16
    want = lse_and_grads(dense_lse_fp64, a16, c16, grad, torch.float64, weight_gamma=1.0)
    assert_close_scaled(lse, want[0], rtol=1e-5, atol=1e-5)
    assert_close_scaled(da, want[1], rtol=1e-2, atol=1e-2)
    assert_close_scaled(dc, want[2], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_on_torch_backends(reduction):
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs("weight_temp", N, M)
    for backend in ("chunked", "reference"):
        x = a.clone().requires_grad_(True)
        out = kernels.sim_softmax_lse(x, c, backend=backend, reduction=reduction, **kwargs)
        x2 = a.clone().requires_grad_(True)
        lse = dense_lse_fp64(x2, c, **kwargs)
        want = lse.mean() if reduction == "mean" else lse.sum()
        assert out.shape == ()
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(want, x2)[0])
    with pytest.raises(ValueError, match="reduction"):
        kernels.sim_softmax_lse(a, c, reduction="max")


def test_default_block_size_bounds_the_tile():
    assert default_block_size(8192, 8192) * 8192 <= 1 << 20
    assert default_block_size(4, 10) == 10
    assert default_block_size(10**7, 100) == 16


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from kernels.chunked import chunked_sim_softmax_lse
    torch.manual_seed(0)
    n, d, workspace = 8192, 128, int(sys.argv[1])
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    c = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    kw = dict(weight_gamma=1.0, tau_min=0.03, tau_max=0.1, workspace_bytes=workspace)
    # warm up allocator and kernels on a small problem, then take the high-water mark as the baseline
    chunked_sim_softmax_lse(a[:64], c[:64], **kw).sum().backward()
    a.grad = c.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lse = chunked_sim_softmax_lse(a, c, **kw)
    path = type(lse.grad_fn).__name__
    lse.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_bytes": (after - before) * 1024, "finite": bool(torch.isfinite(a.grad).all()),
                      "path": path}))
""")


def _peak_extra(workspace):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(workspace)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"]
    return result


@pytest.mark.slow
def test_chunked_memory_is_bounded_by_the_workspace():
    """N = M = 8192, D = 128 soft family fwd+bwd. One dense N x M fp32 matrix is 256 MiB: with a budget one
    byte short of it the recompute path runs, peak extra RSS a quarter of it at most; with exactly that
    budget the kept path runs, peak extra RSS the budget plus stripe temporaries and O((N + M) D)."""
    dense_bytes = 8192 * 8192 * 4
    recompute = _peak_extra(dense_bytes - 1)
    assert "Kept" not in recompute["path"]
    assert recompute["peak_extra_bytes"] < dense_bytes // 4, recompute
    kept = _peak_extra(dense_bytes)
    assert "Kept" in kept["path"]
    # stripes of 64 rows x 8192 (2 MiB temporaries), fp32 copies of A and C and the two grads: 16 MiB
    assert kept["peak_extra_bytes"] < dense_bytes + (48 << 20), kept
