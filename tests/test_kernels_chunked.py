"""The chunked torch backend (``kernels/chunked.py``) against the independent float64 formula (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels.chunked import chunked_sim_softmax_lse, default_block_size
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


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("block_size", [1, 16, None], ids=["block1", "block16", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_dense_fp64(case, block_size, dtype, tol):
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs(case, N, M)
    grad = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(chunked_sim_softmax_lse, a, c, grad, dtype, block_size=block_size, **kwargs)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=tol, atol=tol, name=name)


@pytest.mark.parametrize("case", ["infonce", "infonce_perm_nls"])
def test_chunked_gradcheck(case):
    a, c = make_inputs(5, 8, 6, exact_pm1=False)
    kwargs = case_kwargs(case, 5, 8)
    a.requires_grad_(True)
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: chunked_sim_softmax_lse(x, y, temperature=0.5, block_size=3, **kwargs), (a, c))


def test_chunked_one_input_requires_grad():
    a, c = make_inputs(N, M, D)
    a.requires_grad_(True)
    lse = chunked_sim_softmax_lse(a, c, weight_gamma=1.0, block_size=8)
    (da,) = torch.autograd.grad(lse.sum(), (a,))
    a2 = a.detach().requires_grad_(True)
    (want,) = torch.autograd.grad(dense_lse_fp64(a2, c, weight_gamma=1.0).sum(), (a2,))
    assert_close_scaled(da, want, rtol=1e-10, atol=1e-10)


def test_chunked_bfloat16_inputs():
    # low-precision inputs are accumulated in fp32; grads come back in the input dtype
    a, c = make_inputs(N, M, D)
    a16, c16 = a.bfloat16(), c.bfloat16()
    grad = torch.ones(N, dtype=torch.float64)
    lse, da, dc = lse_and_grads(chunked_sim_softmax_lse, a16, c16, grad, torch.bfloat16, weight_gamma=1.0)
    assert lse.dtype == torch.float32 and da.dtype == torch.bfloat16 and dc.dtype == torch.bfloat16
    want = lse_and_grads(dense_lse_fp64, a16, c16, grad, torch.float64, weight_gamma=1.0)
    assert_close_scaled(lse, want[0], rtol=1e-5, atol=1e-5)
    assert_close_scaled(da, want[1], rtol=1e-2, atol=1e-2)
    assert_close_scaled(dc, want[2], rtol=1e-2, atol=1e-2)


def test_default_block_size_bounds_the_tile():
    assert default_block_size(8192, 8192) * 8192 <= 1 << 20
    assert default_block_size(4, 10) == 10
    assert default_block_size(10**7, 100) == 16


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from kernels.chunked import chunked_sim_softmax_lse
    torch.manual_seed(0)
    n, d = 8192, 128
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    c = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    # warm up allocator and kernels on a small problem, then take the high-water mark as the baseline
    chunked_sim_softmax_lse(a[:64], c[:64], weight_gamma=1.0, tau_min=0.03, tau_max=0.1).sum().backward()
    a.grad = c.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lse = chunked_sim_softmax_lse(a, c, weight_gamma=1.0, tau_min=0.03, tau_max=0.1)
    lse.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_bytes": (after - before) * 1024, "finite": bool(torch.isfinite(a.grad).all())}))
""")


@pytest.mark.slow
def test_chunked_memory_is_not_quadratic():
    """N = M = 8192, D = 128 fwd+bwd: peak extra RSS far below one dense N x M fp32 matrix (256 MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"]
    dense_bytes = 8192 * 8192 * 4
    # the grads alone are 8 MiB (sanity of the measurement); the bound is a quarter of one dense matrix
    assert result["peak_extra_bytes"] < dense_bytes // 4, result
