"""CPU benchmark of ``kernels.sim_softmax_lse`` (chunked backend): kept vs recompute path vs naive torch.

    python benchmarks/kernel_cpu.py [--sizes 2048x2048] [--dim 384] [--reps 15] [--output results/kernel_cpu.json]

Every method runs forward+backward of ``op(a, c).mean()`` (the callers' reduction) on the same fp32 inputs,
round-robin (one repetition of each method in turn, ``--reps`` rounds), so load from other processes hits
all of them alike; the table gives medians and the ratio to naive torch measured in the same run.
Methods: ``naive`` (``kernels.sim_softmax_lse_ref(upcast=False)`` + autograd: the dense graph in the input
dtype), ``logsumexp`` (plain ``torch.logsumexp(a @ c.T / tau)``, InfoNCE only), ``kept`` (chunked backend,
default workspace: the N x M logits kept), ``recompute`` (chunked backend, ``workspace_bytes=0``),
``compiled`` (``torch.compile`` of naive; only with ``--compile``, it needs a C++ compiler). ``--memory``
also runs each method once in a fresh subprocess and records its peak extra RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import kernels  # noqa: E402

FAMILIES = {
    "infonce": dict(temperature=0.05),
    "soft": dict(temperature=0.05, weight_gamma=1.0, tau_min=0.03, tau_max=0.1, tau_gamma=1.0),
}


def make_methods(family: str, compile_naive: bool) -> dict:
    kw = FAMILIES[family]
    methods = {
        "naive": lambda a, c: kernels.sim_softmax_lse_ref(a, c, upcast=False, **kw),
        "kept": lambda a, c: kernels.sim_softmax_lse(a, c, backend="chunked", **kw),
        "recompute": lambda a, c: kernels.sim_softmax_lse(a, c, backend="chunked", workspace_bytes=0, **kw),
    }
    if family == "infonce":
        methods["logsumexp"] = lambda a, c: torch.logsumexp(a @ c.T / kw["temperature"], dim=1)
    if compile_naive:
        methods["compiled"] = torch.compile(methods["naive"], dynamic=False)
    return methods


def inputs(n, m, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).requires_grad_(True)
    c = torch.nn.functional.normalize(torch.randn(m, dim, generator=gen), dim=1).requires_grad_(True)
    return a, c


def step(fn, a, c):
    a.grad = c.grad = None
    fn(a, c).mean().backward()


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_mib(n, m, dim, family, method) -> float:
    """Peak extra RSS (MiB) of one fwd+bwd in a fresh process, after a small warm-up (Linux: the
    high-water mark VmHWM is reset through /proc/self/clear_refs, then compared with VmRSS before)."""
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.kernel_cpu import *\n"
            "ms = make_methods(%r, False); a, c = inputs(64, 64, %d); step(ms[%r], a, c)\n"
            "a, c = inputs(%d, %d, %d); before = vm_kib('VmRSS'); open('/proc/self/clear_refs', 'w').write('5')\n"
            "step(ms[%r], a, c); print((vm_kib('VmHWM') - before) / 1024)"
            % (ROOT, family, dim, method, n, m, dim, method))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048x2048", help="comma list of NxM")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--families", default="infonce,soft")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(naive)")
    parser.add_argument("--memory", action="store_true", help="also record peak extra RSS per method")
    parser.add_argument("--output", default=None, help="JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(env=dict(torch=torch.__version__, python=platform.python_version(),
                            threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                            load_avg_start=os.getloadavg()), rows=[])
    print(f"{'N x M':>11} {'D':>4} {'family':>7} {'method':>10} {'f+b ms':>8} {'min ms':>8} {'x naive':>7}"
          f"{' peak MiB' if args.memory else ''}", flush=True)
    for size in args.sizes.split(","):
        n, m = (int(v) for v in size.split("x"))
        a, c = inputs(n, m, args.dim)
        for family in args.families.split(","):
            methods = make_methods(family, args.compile)
            times = {name: [] for name in methods}
            for fn in methods.values():  # warm-up (and compilation)
                step(fn, a, c)
            for _ in range(args.reps):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    step(fn, a, c)
                    times[name].append(time.perf_counter() - t0)
            naive_ms = statistics.median(times["naive"]) * 1e3
            for name, ts in times.items():
                row = dict(n=n, m=m, d=args.dim, family=family, method=name,
                           fwd_bwd_ms=statistics.median(ts) * 1e3, min_ms=min(ts) * 1e3)
                row["vs_naive"] = row["fwd_bwd_ms"] / naive_ms
                if args.memory:
                    row["peak_extra_mib"] = peak_extra_mib(n, m, args.dim, family, name)
                results["rows"].append(row)
                mem = f" {row['peak_extra_mib']:8.0f}" if args.memory else ""
                print(f"{n:>5}x{m:<5} {args.dim:>4} {family:>7} {name:>10} {row['fwd_bwd_ms']:8.1f} "
                      f"{row['min_ms']:8.1f} {row['vs_naive']:7.3f}{mem}", flush=True)
    results["env"]["load_avg_end"] = os.getloadavg()
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
