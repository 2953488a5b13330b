"""The torch reference of ``kernels.sim_softmax_lse`` and the public functional's contract (CPU)."""

from __future__ import annotations

import ast
import os

import pytest
import torch

import kernels
from kernels import sim_softmax_lse_ref
from tests.test_kernels_helpers import (
    CASES,
    assert_close_scaled,
    case_kwargs,
    dense_lse_fp64,
    lse_and_grads,
    make_inputs,
)

N, M, D = 37, 53, 24


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_dense_fp64(case):
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs(case, N, M)
    grad = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = lse_and_grads(dense_lse_fp64, a, c, grad, torch.float64, **kwargs)
    got = lse_and_grads(sim_softmax_lse_ref, a, c, grad, torch.float64, **kwargs)
    for name, x, y in zip(("lse", "da", "dc"), got, want):
        assert_close_scaled(x, y, rtol=1e-10, atol=1e-10, name=name)


@pytest.mark.parametrize("case", ["infonce", "infonce_perm_nls"])
def test_reference_gradcheck(case):
    # gradcheck differentiates everything, so only families whose w/tau do not depend on s qualify
    a, c = make_inputs(5, 8, 6, exact_pm1=False)
    kwargs = case_kwargs(case, 5, 8)
    a.requires_grad_(True)
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: sim_softmax_lse_ref(x, y, temperature=0.5, **kwargs), (a, c))


def test_exact_pm1_similarities_are_finite():
    a, c = make_inputs(N, M, D)
    sim = a @ c.T
    assert (sim == 1.0).any() and (sim == -1.0).any()
    for backend in ("reference", "chunked"):
        _, da, dc = lse_and_grads(kernels.sim_softmax_lse, a, c, torch.ones(N, dtype=torch.float64),
                                  torch.float32, weight_gamma=3.0, tau_min=0.02, tau_max=0.1, backend=backend)
        assert torch.isfinite(da).all() and torch.isfinite(dc).all()


def test_reference_upcast_false_keeps_float32():
    a, c = make_inputs(N, M, D)
    lse = sim_softmax_lse_ref(a.float(), c.float(), upcast=False)
    assert lse.dtype == torch.float32
    assert_close_scaled(lse, dense_lse_fp64(a.float(), c.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["infonce", "weight_temp", "perm_nls"])
def test_reference_upcast_false_computes_in_bfloat16(case):
    # the "torch in the same dtype" baseline: bf16 stays bf16 (lse and grads), farther from fp64 than upcast
    a, c = make_inputs(N, M, D)
    a16, c16 = a.bfloat16(), c.bfloat16()
    kwargs = case_kwargs(case, N, M)
    grad = torch.ones(N, dtype=torch.float64)
    want = lse_and_grads(dense_lse_fp64, a16, c16, grad, torch.float64, **kwargs)
    low = lse_and_grads(lambda x, y, **kw: sim_softmax_lse_ref(x, y, upcast=False, **kw), a16, c16, grad,
                        torch.bfloat16, **kwargs)
    high = lse_and_grads(sim_softmax_lse_ref, a16, c16, grad, torch.bfloat16, **kwargs)
    assert [t.dtype for t in low] == [torch.bfloat16] * 3
    assert high[0].dtype == torch.float32 and high[1].dtype == torch.bfloat16
    assert_close_scaled(low[0], want[0], rtol=2e-2, atol=2e-2)
    assert_close_scaled(high[0], want[0], rtol=1e-6, atol=1e-6)
    assert (low[0].double() - want[0]).abs().max() > (high[0].double() - want[0]).abs().max()


def test_reference_backend_computes_in_float32_for_bfloat16():
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs("weight_temp", N, M)
    lse = kernels.sim_softmax_lse(a.bfloat16(), c.bfloat16(), backend="reference", **kwargs)
    assert lse.dtype == torch.float32
    assert_close_scaled(lse, dense_lse_fp64(a.bfloat16(), c.bfloat16(), **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
def test_no_host_reads_of_device_tensors(backend):
    """On the meta device any read of tensor values (.item(), .tolist(), nonzero) raises: the op, its
    backward and mean_negative_weight only check shapes there, i.e. never sync a GPU with the host."""
    a = torch.randn(6, 8, device="meta", requires_grad=True)
    c = torch.randn(10, 8, device="meta", requires_grad=True)
    pos, nls = torch.arange(6, device="meta") + 2, torch.zeros(6, device="meta")
    lse = kernels.sim_softmax_lse(a, c, weight_gamma=1.5, tau_min=0.03, tau_max=0.1, positive_index=pos,
                                  neg_log_scale=nls, backend=backend)
    lse.sum().backward()
    assert lse.shape == (6,) and a.grad.shape == (6, 8) and c.grad.shape == (10, 8)
    assert kernels.mean_negative_weight(a, c, weight_gamma=2.0, positive_index=pos).shape == (6,)


def test_kernels_modules_import_no_cycle():
    """The package's internal import graph (kernels.X -> kernels.Y, lazy imports in functions included) is
    acyclic; ``from kernels import ...`` counts as importing ``__init__``."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    graph = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name)) as f:
                tree = ast.parse(f.read())
            # relative imports (`from .family import ...`, what the package uses) count as `kernels.family`
            modules = [("kernels." if node.level else "") + node.module
                       for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
            modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
            graph[name[:-3]] = {m.split(".")[1] if "." in m else "__init__" for m in modules
                                if m == "kernels" or m.startswith("kernels.")}
    assert {"dispatch", "family", "reference", "chunked", "triton_op"} <= set(graph)
    done, visiting = set(), []

    def visit(mod):
        assert mod not in visiting, f"import cycle: {' -> '.join(visiting + [mod])}"
        if mod in done:
            return
        visiting.append(mod)
        for dep in graph.get(mod, ()):
            visit(dep)
        visiting.pop()
        done.add(mod)

    for mod in graph:
        visit(mod)


@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_functional_backends_agree_on_cpu(backend):
    a, c = make_inputs(N, M, D)
    kwargs = case_kwargs("weight_temp", N, M)
    lse = kernels.sim_softmax_lse(a.float(), c.float(), backend=backend, **kwargs)
    assert lse.shape == (N,) and lse.dtype == torch.float32
    assert_close_scaled(lse, dense_lse_fp64(a, c, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_gamma", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("permute", [False, True])
def test_mean_negative_weight(weight_gamma, permute):
    a, c = make_inputs(N, M, D)
    pos = torch.randperm(M, generator=torch.Generator().manual_seed(3))[:N] if permute else None
    got = kernels.mean_negative_weight(a, c, weight_gamma=weight_gamma, positive_index=pos, block_size=7)
    w = ((1.0 - (a @ c.T).clamp(-1, 1)) / 2.0) ** weight_gamma
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[torch.arange(N), torch.arange(N) if pos is None else pos] = False
    want = (w * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_neg_log_scale_renormalises_to_unit_mean_weight():
    # the loss's use: log w + neg_log_scale with scale = -log(mean w) makes negatives average weight 1
    a, c = make_inputs(N, M, D, exact_pm1=False)
    mean_w = kernels.mean_negative_weight(a, c, weight_gamma=2.0)
    lse = kernels.sim_softmax_lse(a, c, weight_gamma=2.0, neg_log_scale=-torch.log(mean_w), backend="reference")
    w = ((1.0 - (a @ c.T)) / 2.0) ** 2.0 / mean_w[:, None]
    w[torch.arange(N), torch.arange(N)] = 1.0
    torch.testing.assert_close(lse, torch.log((w * torch.exp((a @ c.T) / 0.05)).sum(1)))


def _bad_calls():
    a, c = make_inputs(6, 9, 4, exact_pm1=False)
    return {
        "unknown backend": (dict(a=a, c=c, backend="cuda-magic"), "unknown backend"),
        "1-D anchors": (dict(a=a[0], c=c), "2-D"),
        "D mismatch": (dict(a=a, c=c[:, :3]), "dim mismatch"),
        "M < N without positive_index": (dict(a=a, c=c[:4]), "M >= N"),
        "positive_index out of range": (dict(a=a, c=c, positive_index=torch.tensor([0, 1, 2, 3, 4, 9])),
                                        "out of range"),
        "negative positive_index": (dict(a=a, c=c, positive_index=torch.tensor([0, 1, 2, 3, 4, -1])),
                                    "out of range"),
        "positive_index shape": (dict(a=a, c=c, positive_index=torch.arange(5)), "shape"),
        "float positive_index": (dict(a=a, c=c, positive_index=torch.arange(6.0)), "integer"),
        "neg_log_scale shape": (dict(a=a, c=c, neg_log_scale=torch.zeros(5)), "neg_log_scale"),
        "tau_min alone": (dict(a=a, c=c, tau_min=0.1), "together"),
        "temperature <= 0": (dict(a=a, c=c, temperature=0.0), "temperature"),
        "temperature inf": (dict(a=a, c=c, temperature=float("inf")), "temperature"),
        "negative weight_gamma": (dict(a=a, c=c, weight_gamma=-1.0), "weight_gamma"),
        "tau_gamma <= 0": (dict(a=a, c=c, tau_min=0.1, tau_max=0.2, tau_gamma=0.0), "tau_gamma"),
        "dtype mismatch": (dict(a=a, c=c.float()), "dtype mismatch"),
    }


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("which", list(_bad_calls()))
def test_bad_inputs_raise_value_error(backend, which):
    kwargs, message = _bad_calls()[which]
    kwargs = dict(kwargs)
    a, c = kwargs.pop("a"), kwargs.pop("c")
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=message):
        kernels.sim_softmax_lse(a, c, **kwargs)
