"""Loss comparison: InfoNCE (SimCSE) vs SoftCSE-weight vs SoftCSE-temperature vs IFTCL, from all-MiniLM-L6-v2.

    python benchmarks/loss_experiment.py [--steps 250] [--output runs/loss_experiment] [--dry-run]
        [--methods simcse softcse_weight softcse_temp iftcl] [-- key.sub=value ...]

Every method starts from the same checkpoint with the same seed, the same shards (the corpus is sharded once
into ``<output>/shards``) and therefore the same data order, and trains the same number of optimizer steps
(``launch_configs/runs/<method>_minilm_cpu.yaml`` plus the overrides below). IFTCL encodes a third view per
step, so its wall time is higher at equal steps; the table reports wall time and throughput beside the scores.
All runs go to ONE MLflow experiment in one store (``sqlite:///<output>/mlflow.db`` unless ``--tracking-uri``).
Each run is a ``python -m trainer train`` subprocess (clean process state per method); a finished run is
skipped and an interrupted one resumed, so re-running the script completes an experiment.

Output: the STS-B dev table (Spearman x100: before training, best with its step, last) on stdout as markdown,
and ``<output>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("simcse", "softcse_weight", "softcse_temp", "iftcl")
LABELS = {
    "simcse": "InfoNCE (SimCSE)",
    "softcse_weight": "SoftCSE weight",
    "softcse_temp": "SoftCSE temperature",
    "iftcl": "IFTCL",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per method (same for all)")
    parser.add_argument("--eval-every", type=int, default=50, help="STS-B dev every N steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared/data/corpus/enwiki_1m_sentences.txt.gz"))
    parser.add_argument("--sts-dir", default=str(ROOT / "data/sts"))
    parser.add_argument("--output", default=str(ROOT / "runs/loss_experiment"))
    parser.add_argument("--experiment", default="loss-experiment-minilm", help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///<output>/mlflow.db")
    parser.add_argument("--force", action="store_true", help="re-run methods that already finished")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra config overrides, all methods")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 0:
        parser.error("--steps must be >= 1 and --eval-every >= 0")
    return args


def shard_corpus(corpus: str, folder: Path) -> Path:
    """Shard the corpus once (all methods then read the same shards in the same seeded order)."""
    if (folder / "manifest.json").is_file():
        return folder
    if not Path(corpus).is_file():
        sys.exit(f"error: corpus not found: {corpus}")
    print(f"sharding {corpus} -> {folder}", flush=True)
    sys.path.insert(0, str(ROOT))
    from trainer.data import build_shards

    build_shards([corpus], folder)
    return folder


def train_command(method: str, args: argparse.Namespace, shards: Path, uri: str) -> tuple[list[str], Path]:
    out_dir = Path(args.output) / method
    overrides = [
        f"output_dir={out_dir}",
        f"seed={args.seed}",
        f"data.train={shards}",
        f"optim.max_steps={args.steps}",
        f"optim.warmup_steps={args.steps // 10}",
        f"eval.sts_dir={args.sts_dir}",
        f"eval.every_steps={args.eval_every}",
        "eval.final_tasks=[stsb_dev]",
        f"tracking.uri={uri}",
        f"tracking.experiment={args.experiment}",
        f"tracking.run_name={method}",
        *args.overrides,
    ]
    config = ROOT / "launch_configs" / "runs" / f"{method}_minilm_cpu.yaml"
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(config), *overrides]
    return cmd, out_dir


def summarize(method: str, out_dir: Path, wall_s: float | None) -> dict:
    """Scores and throughput from the run's metrics.jsonl (written by the engine on rank 0)."""
    evals, losses, speeds = [], [], []
    metrics = out_dir / "metrics.jsonl"
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []:
        row = json.loads(line)
        if "eval/stsb_dev" in row:
            evals.append((row["step"], row["eval/stsb_dev"]))
        if "train/loss" in row:
            losses.append(row["train/loss"])
        if "throughput/sentences_per_s" in row:
            speeds.append(row["throughput/sentences_per_s"])
    best = max(evals, key=lambda e: e[1]) if evals else (None, None)
    return {
        "method": method,
        "label": LABELS[method],
        "stsb_dev_before": evals[0][1] if evals and evals[0][0] == 0 else None,
        "stsb_dev_best": best[1],
        "best_step": best[0],
        "stsb_dev_last": evals[-1][1] if evals else None,
        "last_step": evals[-1][0] if evals else None,
        "final_train_loss": losses[-1] if losses else None,
        "sentences_per_s": sum(speeds) / len(speeds) if speeds else None,
        "wall_s": wall_s,
        "evals": evals,
    }


def table(rows: list[dict]) -> str:
    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        "| method | STS-B dev before | best (step) | last (step) | final train loss | sentences/s | wall min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = None if r["wall_s"] is None else r["wall_s"] / 60
        lines.append(
            f"| {r['label']} | {f(r['stsb_dev_before'])} | {f(r['stsb_dev_best'])} ({r['best_step']}) | "
            f"{f(r['stsb_dev_last'])} ({r['last_step']}) | {f(r['final_train_loss'], '.4f')} | "
            f"{f(r['sentences_per_s'], '.1f')} | {f(wall, '.1f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output).resolve()
    args.output = str(output)
    uri = args.tracking_uri or f"sqlite:///{output / 'mlflow.db'}"
    shards = output / "shards"
    plan = [(m, *train_command(m, args, shards, uri)) for m in args.methods]
    if args.dry_run:
        for method, cmd, _ in plan:
            print(f"# {method}\n{shlex.join(cmd)}")
        return 0
    output.mkdir(parents=True, exist_ok=True)
    shard_corpus(args.corpus, shards)
    results_file = output / "results.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    rows = []
    for method, cmd, out_dir in plan:
        finished = (out_dir / "sts_results.json").is_file() and not args.force
        wall_s = previous.get(method, {}).get("wall_s")
        if not finished:
            if args.force and out_dir.exists():
                shutil.rmtree(out_dir)
            elif (out_dir / "checkpoints").is_dir():
                cmd = [*cmd[:4], "--resume", *cmd[4:]]  # an interrupted run: continue it
            print(f"\n=== {LABELS[method]}: {shlex.join(cmd)}", flush=True)
            started = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT)
            wall_s = time.perf_counter() - started
            if proc.returncode != 0:
                print(f"{method} failed with exit code {proc.returncode}", file=sys.stderr)
        rows.append(summarize(method, out_dir, wall_s))
        results_file.write_text(json.dumps({r["method"]: r for r in rows} | {
            m: v for m, v in previous.items() if m not in {r["method"] for r in rows}}, indent=2))
    print(f"\nSTS-B dev, Spearman x100 ({args.steps} steps each, seed {args.seed}, "
          f"MLflow experiment '{args.experiment}' at {uri}):\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
