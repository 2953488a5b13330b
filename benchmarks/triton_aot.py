"""Compile the Triton kernels for a GPU target WITHOUT a GPU: catches compile-only errors (the interpreter
runs none of Triton's lowering) and reports registers / stack (spills) per kernel and block configuration.

    python benchmarks/triton_aot.py [--arch 90] [--dtypes bf16,fp16,fp32] [--keep-sweep]

Uses ``triton.compile`` on an ``ASTSource`` for ``GPUTarget("cuda", arch, 32)`` and ``cuobjdump
--dump-resource-usage`` from the triton wheel on the cubin. Figures depend on the installed triton version
(a GPU machine with another triton may allocate differently): compare configurations, not machines.
Kernel arguments follow the launchers in ``kernels/triton_op.py`` and ``kernels/triton_keep.py``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import triton_kernels as K  # noqa: E402

FAMILY_ARGS = dict(inv_temp2="fp32", weight_gamma="fp32", tau_min2="fp32", tau_delta2="fp32", tau_gamma="fp32")
FAMILIES = {"infonce": dict(WEIGHT_POW=0, TAU_POW=0, HAS_NLS=False, HAS_POS=False),
            "soft": dict(WEIGHT_POW=1, TAU_POW=1, HAS_NLS=False, HAS_POS=True)}


def arg_types(kernel: str, dt: str) -> dict:
    p = "*" + dt
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    if kernel == "keep":
        return dict(A=p, C=p, POS="*i32", NLS="*fp32", P=p, REFS="*fp32", REF_S="*fp32", L_S="*fp32",
                    **ints("N", "M", "D", "stride_a", "stride_c", "stride_p", "row0", "n_tiles", "cols_per_split"),
                    **FAMILY_ARGS, inv_tau2_max="fp32")
    if kernel == "grad":
        return dict(A=p, C=p, POS="*i32", NLS="*fp32", LSE="*fp32", GRAD="*fp32", G=p,
                    **ints("N", "M", "D", "stride_a", "stride_c", "stride_g", "row0", "col0"), **FAMILY_ARGS)
    if kernel == "fwd":
        return dict(A=p, C=p, POS="*i32", NLS="*fp32", LSE_PART="*fp32",
                    **ints("N", "M", "D", "stride_a", "stride_c", "cols_per_split"), **FAMILY_ARGS)
    return dict(P=p, REFS="*fp32", REF_S="*fp32", **ints("N", "M", "stride_p", "row0", "n_tiles", "cols_per_split"))


def compile_kernel(fn, types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resource_usage(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out.stdout + out.stderr)
    return f"registers {m.group(1)}, stack {m.group(2)} B" if m else (out.stdout + out.stderr)[-200:]


def plan(dtypes, keep_sweep):
    """(label, kernel fn, types, constexprs, warps, stages) at the launchers' default GPU configurations."""
    for dt in dtypes:
        dots = dict(DOT_FP32=dt == "fp32", IEEE_FP32=dt == "fp32")
        tile = (64, 64, 32, 4, 2) if dt == "fp32" else (128, 128, 64, 8, 3)
        fwd_tile = (64, 64, 32, 4, 2) if dt == "fp32" else (128, 256, 64, 8, 3)
        for fam_name, fam in FAMILIES.items():
            keep_tiles = [tile]
            if keep_sweep and dt != "fp32":
                keep_tiles += [(128, 64, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 8, 2)]
            for bn, bm, bd, w, st in keep_tiles:
                yield (f"keep {dt} {fam_name} {bn}x{bm}x{bd} w{w} s{st}", K.fwd_keep_kernel, arg_types("keep", dt),
                       dict(fam, HEADROOM=8.0 if dt == "fp16" else 32.0, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd,
                            EVEN_D=True, **dots), w, st)
            bn, bm, bd, w, st = tile
            yield (f"grad {dt} {fam_name} {bn}x{bm}x{bd} w{w} s{st}", K.bwd_grad_kernel, arg_types("grad", dt),
                   dict(fam, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, EVEN_D=True, **dots), w, st)
            bn, bm, bd, w, st = fwd_tile
            yield (f"fwd {dt} {fam_name} {bn}x{bm}x{bd} w{w} s{st}", K.fwd_kernel, arg_types("fwd", dt),
                   dict(fam, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, EVEN_D=True, FLAT=False, **dots), w, st)
        bm = tile[1]
        yield (f"fixup {dt} 32x{bm} w4", K.keep_fixup_kernel, arg_types("fixup", dt), dict(BLOCK_N=32, BLOCK_M=bm),
               4, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--keep-sweep", action="store_true", help="also a few keep-kernel block configurations")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    failed = 0
    for label, fn, types, constexprs, warps, stages in plan(args.dtypes.split(","), args.keep_sweep):
        try:
            print(f"{label:40} {resource_usage(compile_kernel(fn, types, constexprs, args.arch, warps, stages))}",
                  flush=True)
        except Exception as exc:  # report every kernel, fail at the end
            failed += 1
            print(f"{label:40} FAILED {type(exc).__name__}: {str(exc)[:600]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
