"""Benchmark of ``kernels.sim_softmax_lse``: Triton vs naive torch vs torch.compile(naive), on one GPU.

    python benchmarks/kernel.py --output results/kernel.json [--sizes 4096x4096,16384x16384] [--sweep]

For each size N x M (D = 768, bf16) and family ("infonce": plain temperature; "soft": weight_gamma=1 plus a
tau_min/tau_max family), it times forward and forward+backward (median of ``triton.testing.do_bench``,
CUDA events), records peak extra GPU memory of one forward+backward (``max_memory_allocated`` over the
inputs), TFLOP/s counting 2NMD (forward) and 8NMD (forward+backward), and the speed-up over naive torch.
Naive runs that do not fit are recorded as OOM. ``--sweep`` also times a few Triton block configurations
(forward kernel; stripe-backward G kernel) and reports registers / spills of the compiled kernels.
Results: a table on stdout and JSON (``--output``), written after every row.
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
DEFAULT_SIZES = "4096x4096,16384x16384,65536x65536,8192x65536"
# (BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages); forward configs add (CTAs per SM for splits, flat loop)
FWD_SWEEP = [(128, 256, 64, 8, 3, 1, False), (128, 256, 64, 8, 3, 1, True), (128, 256, 64, 8, 4, 1, True),
             (128, 128, 64, 8, 4, 1, True), (128, 128, 64, 4, 3, 2, True), (256, 128, 64, 8, 3, 1, True)]
GRAD_SWEEP = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
              (64, 256, 64, 8, 3), (128, 128, 64, 4, 4)]


def naive_lse(a, c, **kwargs):
    """Dense torch in the input dtype (the reference with ``upcast=False``): matmul, family, logsumexp."""
    return sim_softmax_lse_ref(a, c, upcast=False, **kwargs)


def triton_fn(config=None):
    return lambda a, c, **kw: triton_sim_softmax_lse(a, c, config=config, **kw)


def measure(fn, a, c, grad, kwargs, rep_ms):
    """(fwd ms, fwd+bwd ms, peak extra MiB of one fwd+bwd); raises torch.cuda.OutOfMemoryError."""
    import triton.testing

    def fwd():
        with torch.no_grad():
            fn(a, c, **kwargs)

    def fwd_bwd():
        fn(a, c, **kwargs).backward(grad)

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


def host_ms(fn, a, c, kwargs, calls=20):
    """Host time per forward call (launch + Python), no sync inside: near fwd ms means launch-bound."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            fn(a, c, **kwargs)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e3


def compiled_info():
    """{role: (registers, spills)} of the Triton kernels launched last."""
    return {k: (getattr(v, "n_regs", None), getattr(v, "n_spills", None)) for k, v in _COMPILED.items()}


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def accuracy(a, c, grad, kwargs):
    """Relative L2 errors of Triton (input dtype) vs the chunked backend in fp32 on the same inputs."""
    outs = []
    for fn, dtype in ((triton_fn(), a.dtype), (chunked_sim_softmax_lse, torch.float32)):
        x = a.detach().to(dtype).requires_grad_(True)
        y = c.detach().to(dtype).requires_grad_(True)
        lse = fn(x, y, **kwargs)
        lse.backward(grad)
        outs.append((lse.detach(), x.grad, y.grad))
    return {name: rel_err(o, r) for name, o, r in zip(("lse", "da", "dc"), outs[0], outs[1])}


def matmul_tflops(n, m, d, dtype):
    import triton.testing

    x = torch.randn(n, d, device="cuda", dtype=dtype)
    y = torch.randn(m, d, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: x @ y.T, warmup=10, rep=100, return_mode="median")
    return 2 * n * m * d / ms / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of NxM")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--families", default="infonce,soft")
    parser.add_argument("--methods", default="triton,naive,compiled,triton_fused")
    parser.add_argument("--compile-max", type=int, default=16384, help="torch.compile only up to this N*M root")
    parser.add_argument("--fused-max", type=int, default=16384, help="triton_fused (no stripes) up to this size")
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--sweep", action="store_true", help="also time FWD_SWEEP / GRAD_SWEEP at 16384x16384")
    parser.add_argument("--output", default=None, help="JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not triton_available():
        sys.exit("benchmarks/kernel.py needs a CUDA GPU and triton")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    dim = args.dim
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    results = dict(
        env=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                 python=platform.python_version(), dtype=args.dtype, dim=dim),
        matmul_tflops={}, rows=[], sweep=[])

    def dump():
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(results, f, indent=1)

    for n in (8192, 16384):
        results["matmul_tflops"][f"{n}x{n}x{dim}"] = matmul_tflops(n, n, dim, dtype)
    print("cuBLAS matmul TFLOP/s:", {k: round(v) for k, v in results["matmul_tflops"].items()}, flush=True)
    dump()

    methods = {
        "triton": triton_fn(),
        "triton_fused": triton_fn(dict(bwd_mode="fused")),
        "naive": naive_lse,
        "compiled": None,  # built per size/family (static shapes)
    }
    header = (f"{'N x M':>13} {'family':>7} {'method':>12} {'fwd ms':>8} {'TF/s':>5} {'f+b ms':>8} {'TF/s':>5} "
              f"{'peak MiB':>9} {'x naive':>7}")
    print(header, flush=True)
    for n, m in sizes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        a = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=gen), dim=1).to(dtype)
        c = torch.nn.functional.normalize(torch.randn(m, dim, device="cuda", generator=gen), dim=1).to(dtype)
        a.requires_grad_(True)
        c.requires_grad_(True)
        grad = torch.randn(n, device="cuda", generator=gen) / n
        for family in args.families.split(","):
            kwargs = FAMILIES[family]
            naive_fb = None
            for method in args.methods.split(","):
                row = dict(n=n, m=m, d=dim, family=family, method=method)
                if method == "compiled" and max(n, m) > args.compile_max:
                    continue
                if method == "triton_fused" and max(n, m) > args.fused_max:
                    continue
                fn = methods[method]
                if method == "compiled":
                    torch._dynamo.reset()
                    fn = torch.compile(naive_lse, dynamic=False)
                t0 = time.perf_counter()
                _COMPILED.clear()
                try:
                    t_fwd, t_fb, peak = measure(fn, a, c, grad, kwargs, args.rep_ms)
                    row.update(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, peak_mib=peak,
                               fwd_tflops=2 * n * m * dim / t_fwd / 1e9, fwd_bwd_tflops=8 * n * m * dim / t_fb / 1e9)
                except torch.cuda.OutOfMemoryError:
                    row.update(status="OOM")
                except Exception as exc:  # record and go on: one failing method must not lose the table
                    row.update(status=f"error: {type(exc).__name__}: {str(exc)[:300]}")
                row["wall_s"] = time.perf_counter() - t0
                a.grad = c.grad = None
                gc.collect()
                torch.cuda.empty_cache()
                if method == "naive" and "fwd_bwd_ms" in row:
                    naive_fb = row["fwd_bwd_ms"]
                if method.startswith("triton") and "fwd_ms" in row:
                    row["kernels"] = compiled_info()
                    row["host_fwd_ms"] = host_ms(fn, a, c, kwargs)
                if method == "triton" and max(n, m) <= 16384:
                    row["rel_err_vs_fp32"] = accuracy(a, c, grad, kwargs)
                results["rows"].append(row)
                dump()
                if "fwd_bwd_ms" in row:
                    speed = f"{naive_fb / row['fwd_bwd_ms']:7.2f}" if naive_fb else f"{'-':>7}"
                    print(f"{n:>6}x{m:<6} {family:>7} {method:>12} {row['fwd_ms']:8.3f} {row['fwd_tflops']:5.0f} "
                          f"{row['fwd_bwd_ms']:8.3f} {row['fwd_bwd_tflops']:5.0f} {row['peak_mib']:9.0f} {speed}"
                          f" {row.get('kernels', '')} host {row.get('host_fwd_ms', float('nan')):.3f} ms",
                          flush=True)
                else:
                    print(f"{n:>6}x{m:<6} {family:>7} {method:>12} {row['status']}", flush=True)
        # the speed-up column is relative to naive of the same size/family; fill it for rows printed before
        for row in results["rows"]:
            base = next((r for r in results["rows"] if r["n"] == row["n"] and r["m"] == row["m"]
                         and r["family"] == row["family"] and r["method"] == "naive" and "fwd_bwd_ms" in r), None)
            if base and "fwd_bwd_ms" in row:
                row["speedup_vs_naive_fwd_bwd"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                row["speedup_vs_naive_fwd"] = base["fwd_ms"] / row["fwd_ms"]
        dump()
        del a, c, grad
        gc.collect()
        torch.cuda.empty_cache()

    if args.sweep:
        n = m = 16384
        gen = torch.Generator(device="cuda").manual_seed(1)
        a = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=gen), dim=1).to(dtype)
        c = torch.nn.functional.normalize(torch.randn(m, dim, device="cuda", generator=gen), dim=1).to(dtype)
        a.requires_grad_(True)
        c.requires_grad_(True)
        grad = torch.randn(n, device="cuda", generator=gen) / n
        plan = [("fwd", cfg, fam) for fam in ("infonce", "soft") for cfg in FWD_SWEEP]
        plan += [("grad", cfg, fam) for fam in ("infonce", "soft") for cfg in GRAD_SWEEP]
        print("sweep at 16384x16384: fwd ms / fwd+bwd ms per config (regs, spills)", flush=True)
        for kind, (bn, bm, bd, warps, stages, *ctas), family in plan:
            if kind == "fwd":
                cfg = dict(fwd_block_n=bn, fwd_block_m=bm, fwd_block_d=bd, fwd_warps=warps, fwd_stages=stages,
                           fwd_ctas_per_sm=ctas[0], fwd_flat=ctas[1])
            else:
                cfg = dict(grad_block_n=bn, grad_block_m=bm, grad_block_d=bd, grad_warps=warps, grad_stages=stages)
            entry = dict(kind=kind, family=family, config=cfg)
            _COMPILED.clear()
            try:
                t_fwd, t_fb, _ = measure(triton_fn(cfg), a, c, grad, FAMILIES[family], args.rep_ms)
                entry.update(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, fwd_tflops=2 * n * m * dim / t_fwd / 1e9,
                             fwd_bwd_tflops=8 * n * m * dim / t_fb / 1e9, kernels=compiled_info())
                print(f"  {kind} {family:>7} {bn}x{bm}x{bd} w{warps} s{stages} {ctas}: {t_fwd:.3f} "
                      f"({entry['fwd_tflops']:.0f} TF/s) / {t_fb:.3f} ({entry['fwd_bwd_tflops']:.0f} TF/s) "
                      f"{entry['kernels']}", flush=True)
            except Exception as exc:
                entry.update(status=f"error: {type(exc).__name__}: {str(exc)[:300]}")
                print(f"  {kind} {bn}x{bm}x{bd} w{warps} s{stages}: {entry['status']}", flush=True)
            a.grad = c.grad = None
            results["sweep"].append(entry)
            dump()
    results["default_config_16384"] = {k: v for k, v in default_triton_config(
        torch.empty(1, dim, device="cuda", dtype=dtype), torch.empty(1, dim, device="cuda", dtype=dtype)).items()}
    dump()


if __name__ == "__main__":
    main()
