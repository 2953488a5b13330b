"""Benchmark of ``kernels.sim_softmax_lse`` on one GPU: ours (Triton) vs naive torch vs torch.compile(naive)
vs Liger / inf-cl where importable, all in the same run.

    python benchmarks/kernel.py --output results/kernel.json [--sizes 16384x16384,8192x65536]
        [--data gaussian,real] [--methods ...] [--sweep]

Every method computes the mean over rows of lse (the callers' reduction: ``loss.backward()`` gives every row
the same upstream grad), for each size N x M (D = 768, bf16) and family ("infonce": one temperature;
"soft": weight_gamma=1 plus a tau_min/tau_max family). It times the forward (no grad) and forward+backward
(median of ``triton.testing.do_bench``, CUDA events), records peak extra GPU memory of one forward+backward
(``max_memory_allocated`` over the inputs), TFLOP/s counting the useful work (2NMD forward, 6NMD
forward+backward: S, dA, dC) as a fraction of the cuBLAS bf16 rate measured at the same shape, and the
speed-up over naive torch. Methods:

- ``triton``: ``sim_softmax_lse(..., reduction="mean")`` with its automatic choice (D > 256: gradient tiles
  produced in the forward, stripes of the 256 MiB workspace, cuBLAS for dA / dC);
- ``triton_recompute``: the same, forced to the recompute path (``keep=False``: 8NMD);
- ``naive``: ``sim_softmax_lse_ref(upcast=False).mean()`` (matmul, family, logsumexp, autograd in bf16);
- ``compiled``: ``torch.compile(naive, dynamic=False)`` (sizes up to ``--compile-max``);
- ``liger``: ``LigerFusedLinearCrossEntropyLoss`` on (A / tau, C, target = positives): plain InfoNCE only,
  it adds the positive term (O(ND));
- ``infcl``: ``inf_cl.cal_inf_loss`` (Inf-CL, scalar temperature, positives on the diagonal): plain InfoNCE
  only, N = M only (it adds the positive term too).
Liger and inf-cl run only when already importable (nothing is installed). ``--data real`` uses
all-MiniLM-L6-v2 embeddings of Wikipedia sentences (anchors vs dropout views + other sentences as extra
negatives, mapped to D by an inner-product-preserving matrix: ``benchmarks/real_embeddings.py``).
``--sweep`` times keep-kernel / G-kernel / forward block configurations at 16384^2 and reports registers and
spills. Results: a table on stdout and JSON (``--output``), written after every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import sim_softmax_lse_ref, triton_available  # noqa: E402
from kernels.chunked import chunked_sim_softmax_lse  # noqa: E402

if triton_available():  # the Triton backend's modules import triton; --help works without it
    from kernels.triton_op import _COMPILED, default_triton_config, triton_sim_softmax_lse

FAMILIES = {
    "infonce": dict(temperature=0.05),
    "soft": dict(temperature=0.05, weight_gamma=1.0, tau_min=0.03, tau_max=0.1, tau_gamma=1.0),
}
DEFAULT_SIZES = "16384x16384,8192x65536"
DEFAULT_METHODS = "triton,triton_recompute,naive,compiled,liger,infcl"
# (BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) for the keep kernel and the recompute G kernel;
# forward configs add (CTAs per SM for splits, flat loop)
KEEP_SWEEP = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 8, 4),
              (256, 128, 64, 8, 3), (128, 64, 64, 8, 3)]
GRAD_SWEEP = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3)]
FWD_SWEEP = [(128, 256, 64, 8, 3, 1, False), (128, 128, 64, 8, 4, 1, True)]


def naive_mean(a, c, **kwargs):
    """Dense torch in the input dtype (the reference with ``upcast=False``), mean over rows."""
    return sim_softmax_lse_ref(a, c, upcast=False, **kwargs).mean()


def triton_fn(config=None):
    return lambda a, c, **kw: triton_sim_softmax_lse(a, c, config=config, reduction="mean", **kw)


def optional_methods(family: str, n: int, m: int) -> dict:
    """Liger / inf-cl where importable and applicable (plain InfoNCE; inf-cl also N = M)."""
    out = {}
    if family != "infonce":
        return out
    tau = FAMILIES["infonce"]["temperature"]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda a, c, **kw: liger(c, a / tau, torch.arange(a.shape[0], device=a.device))
    except ImportError:
        pass
    try:
        from inf_cl import cal_inf_loss

        if n == m:
            out["infcl"] = lambda a, c, **kw: cal_inf_loss(a, c, scale=1.0 / tau)
    except ImportError:
        pass
    return out


def measure(fn, a, c, kwargs, rep_ms):
    """(fwd ms, fwd+bwd ms, peak extra MiB of one fwd+bwd); raises torch.cuda.OutOfMemoryError."""
    import triton.testing

    def fwd():
        with torch.no_grad():
            fn(a, c, **kwargs)

    def fwd_bwd():
        fn(a, c, **kwargs).backward()

    fwd_bwd()  # compile / warm up
    a.grad = c.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    a.grad = c.grad = None
    t_fwd = triton.testing.do_bench(fwd, warmup=10, rep=rep_ms, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, warmup=10, rep=rep_ms, grad_to_none=[a, c], return_mode="median")
    return t_fwd, t_fb, peak


def compiled_info():
    """{role: (registers, spills)} of the Triton kernels launched last."""
    return {k: (getattr(v, "n_regs", None), getattr(v, "n_spills", None)) for k, v in _COMPILED.items()}


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def accuracy(a, c, kwargs):
    """Relative L2 errors of ``triton`` (input dtype) vs the chunked backend in fp32 on the same inputs."""
    outs = []
    for fn, dtype in ((triton_fn(), a.dtype), (lambda x, y, **kw: chunked_sim_softmax_lse(x, y, **kw).mean(),
                                               torch.float32)):
        x = a.detach().to(dtype).requires_grad_(True)
        y = c.detach().to(dtype).requires_grad_(True)
        out = fn(x, y, **kwargs)
        out.backward()
        outs.append((out.detach(), x.grad, y.grad))
    return {name: rel_err(o, r) for name, o, r in zip(("mean_lse", "da", "dc"), outs[0], outs[1])}


def matmul_tflops(n, m, d, dtype):
    """cuBLAS rate of ``x @ y.T`` at this shape (the roofline the useful-work rate is compared with)."""
    import triton.testing

    x = torch.randn(n, d, device="cuda", dtype=dtype)
    y = torch.randn(m, d, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: x @ y.T, warmup=10, rep=100, return_mode="median")
    return 2 * n * m * d / ms / 1e9


def make_inputs(data, n, m, dim, dtype, seed=0, real_cache=None):
    if data == "real":
        from benchmarks.real_embeddings import real_embeddings

        a, c = real_embeddings(n, m, dim=dim, device="cuda", dtype=dtype, seed=seed, cache=real_cache)
    else:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        a = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=gen), dim=1).to(dtype)
        c = torch.nn.functional.normalize(torch.randn(m, dim, device="cuda", generator=gen), dim=1).to(dtype)
    return a.requires_grad_(True), c.requires_grad_(True)


def run_method(fn, a, c, kwargs, rep_ms, row, cublas):
    n, m, dim = row["n"], row["m"], row["d"]
    t0 = time.perf_counter()
    _COMPILED.clear()
    try:
        t_fwd, t_fb, peak = measure(fn, a, c, kwargs, rep_ms)
        useful = 6 * n * m * dim / t_fb / 1e9
        row.update(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, peak_mib=peak, fwd_tflops=2 * n * m * dim / t_fwd / 1e9,
                   useful_tflops=useful, useful_vs_cublas=useful / cublas)
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as exc:  # record and go on: one failing method must not lose the table
        row.update(status=f"error: {type(exc).__name__}: {str(exc)[:300]}")
    row["wall_s"] = time.perf_counter() - t0
    if row["method"].startswith("triton") and "fwd_ms" in row:
        row["kernels"] = compiled_info()
    a.grad = c.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return row


def print_row(row, naive_fb):
    head = f"{row['data']:>8} {row['n']:>6}x{row['m']:<6} {row['family']:>7} {row['method']:>16}"
    if "fwd_bwd_ms" not in row:
        print(f"{head} {row['status']}", flush=True)
        return
    speed = f"{naive_fb / row['fwd_bwd_ms']:7.2f}" if naive_fb else f"{'-':>7}"
    print(f"{head} {row['fwd_ms']:8.3f} {row['fwd_bwd_ms']:8.3f} {row['useful_tflops']:6.0f} "
          f"{100 * row['useful_vs_cublas']:5.0f}% {row['peak_mib']:8.0f} {speed} {row.get('kernels', '')}", flush=True)


def sweep(args, dtype, results, dump):
    n = m = 16384
    a, c = make_inputs("gaussian", n, m, args.dim, dtype, seed=1)
    cublas = results["matmul_tflops"].get(f"{n}x{m}x{args.dim}") or matmul_tflops(n, m, args.dim, dtype)
    plan = [("keep", cfg, fam) for fam in ("infonce", "soft") for cfg in KEEP_SWEEP]
    plan += [("grad", cfg, "infonce") for cfg in GRAD_SWEEP] + [("fwd", cfg, "infonce") for cfg in FWD_SWEEP]
    print("sweep at 16384x16384 (keep: fwd+bwd of the forward-grad path; grad: recompute path)", flush=True)
    for kind, (bn, bm, bd, warps, stages, *extra), family in plan:
        if kind == "keep":
            cfg = dict(keep_block_n=bn, keep_block_m=bm, keep_block_d=bd, keep_warps=warps, keep_stages=stages)
        elif kind == "grad":
            cfg = dict(keep=False, grad_block_n=bn, grad_block_m=bm, grad_block_d=bd, grad_warps=warps,
                       grad_stages=stages)
        else:
            cfg = dict(keep=False, fwd_block_n=bn, fwd_block_m=bm, fwd_block_d=bd, fwd_warps=warps,
                       fwd_stages=stages, fwd_ctas_per_sm=extra[0], fwd_flat=extra[1])
        row = run_method(triton_fn(cfg), a, c, FAMILIES[family], args.rep_ms,
                         dict(data="gaussian", n=n, m=m, d=args.dim, family=family, method=f"sweep-{kind}",
                              config=cfg), cublas)
        results["sweep"].append(row)
        print(f"  {kind} {family:>7} {bn}x{bm}x{bd} w{warps} s{stages} {extra}: "
              f"{row.get('fwd_ms', float('nan')):.3f} / {row.get('fwd_bwd_ms', float('nan')):.3f} ms "
              f"{row.get('kernels', row.get('status', ''))}", flush=True)
        dump()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of NxM")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--families", default="infonce,soft")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--data", default="gaussian", help="comma list of gaussian, real")
    parser.add_argument("--real-max", type=int, default=16384, help="real data only up to this max(N, M)")
    parser.add_argument("--real-cache", default=None, help="embeddings file of benchmarks/real_embeddings.py")
    parser.add_argument("--compile-max", type=int, default=16384, help="torch.compile only up to this max(N, M)")
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--sweep", action="store_true", help="also time KEEP/GRAD/FWD_SWEEP at 16384x16384")
    parser.add_argument("--output", default=None, help="JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not triton_available():
        sys.exit("benchmarks/kernel.py needs a CUDA GPU and triton (CPU: benchmarks/kernel_cpu.py)")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    results = dict(env=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                            python=platform.python_version(), dtype=args.dtype, dim=args.dim),
                   matmul_tflops={}, rows=[], sweep=[])

    def dump():
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(results, f, indent=1)

    for n, m in sizes:
        results["matmul_tflops"][f"{n}x{m}x{args.dim}"] = matmul_tflops(n, m, args.dim, dtype)
    print("cuBLAS x @ y.T TFLOP/s:", {k: round(v) for k, v in results["matmul_tflops"].items()}, flush=True)
    dump()
    print(f"{'data':>8} {'N x M':>13} {'family':>7} {'method':>16} {'fwd ms':>8} {'f+b ms':>8} {'TF/s6':>6} "
          f"{'cuBLAS':>6} {'peak MiB':>8} {'x naive':>7}", flush=True)
    for data in args.data.split(","):
        for n, m in sizes:
            if data == "real" and max(n, m) > args.real_max:
                continue
            a, c = make_inputs(data, n, m, args.dim, dtype, real_cache=args.real_cache)
            cublas = results["matmul_tflops"][f"{n}x{m}x{args.dim}"]
            for family in args.families.split(","):
                kwargs = FAMILIES[family]
                methods = {"triton": triton_fn(), "triton_recompute": triton_fn(dict(keep=False)),
                           "naive": naive_mean, **optional_methods(family, n, m)}
                naive_fb = None
                for method in args.methods.split(","):
                    if method == "compiled" and max(n, m) <= args.compile_max:
                        torch._dynamo.reset()
                        methods["compiled"] = torch.compile(naive_mean, dynamic=False)
                    if method not in methods:
                        continue
                    row = run_method(methods[method], a, c, kwargs, args.rep_ms,
                                     dict(data=data, n=n, m=m, d=args.dim, family=family, method=method), cublas)
                    if method == "naive" and "fwd_bwd_ms" in row:
                        naive_fb = row["fwd_bwd_ms"]
                    if method == "triton" and max(n, m) <= 16384 and "fwd_ms" in row:
                        row["rel_err_vs_fp32"] = accuracy(a, c, kwargs)
                    results["rows"].append(row)
                    print_row(row, naive_fb)
                    dump()
                for row in results["rows"]:  # speed-ups relative to naive of the same data/size/family
                    same = dict(data=data, n=n, m=m, family=family)
                    if all(row[k] == v for k, v in same.items()) and naive_fb and "fwd_bwd_ms" in row:
                        row["speedup_vs_naive_fwd_bwd"] = naive_fb / row["fwd_bwd_ms"]
                dump()
            del a, c
            gc.collect()
            torch.cuda.empty_cache()
    if args.sweep:
        sweep(args, dtype, results, dump)
    results["default_config"] = default_triton_config(torch.empty(1, args.dim, device="cuda", dtype=dtype),
                                                      torch.empty(1, args.dim, device="cuda", dtype=dtype))
    dump()


if __name__ == "__main__":
    main()
