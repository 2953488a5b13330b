"""Tables, plots and results.json of ``benchmarks/fidelity_experiment.py``, from what the runs left on disk.

Per run: ``metrics.jsonl`` (STS-B dev every eval, train metrics every log step) and ``heldout.json`` (the
selected model's STS-B dev, STS-B train and SICK train+trial, its wall time and export folder). Per setting
and method: mean +- sample std over seeds; paired differences against InfoNCE per seed (a method's run and
InfoNCE's run of one seed share data order, initial weights and dropout draws), with how many seeds favour
the method. A run that is not finished is listed as missing, never averaged in.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Optional

SCORES = (("stsb_dev", "STS-B dev (selection)"), ("stsb_train", "STS-B train (held out)"),
          ("sick_train_trial", "SICK train+trial (held out)"))
MECHANISMS = ("pos_sim", "hardest_neg_sim", "neg_softmax_mass", "hardest_neg_weight", "hardest_neg_tau",
              "margin_mean", "hinge_active_frac", "fraternal_unchanged_frac", "queue_fill")
START, END = "<!-- fidelity-results:start -->", "<!-- fidelity-results:end -->"


def read_run(run: dict) -> dict:
    """One run's record: its plan entry plus what it wrote (None values when it has not finished)."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in run.items()}
    evals, last_train, speeds = [], {}, []
    metrics = run["dir"] / "metrics.jsonl"
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []:
        row = json.loads(line)
        if "eval/stsb_dev" in row:
            evals.append((row["step"], row["eval/stsb_dev"]))
        if "train/loss" in row:
            last_train = {k[6:]: v for k, v in row.items() if k.startswith("train/")}
        if "throughput/sentences_per_s" in row:
            speeds.append(row["throughput/sentences_per_s"])
    heldout = run["dir"] / "heldout.json"
    record = json.loads(heldout.read_text()) if heldout.is_file() else {}
    best = max(evals, key=lambda e: e[1]) if evals else (None, None)
    out.update(finished=bool(record), evals=evals, before=evals[0][1] if evals and evals[0][0] == 0 else None,
               best_step=best[0], scores=record.get("scores", {}), wall_s=record.get("wall_s"),
               export=record.get("export"), sentences_per_s=statistics.mean(speeds) if speeds else None,
               mechanisms={k: last_train[k] for k in MECHANISMS if k in last_train},
               final_train_loss=last_train.get("loss"))
    return out


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(mean: Optional[float], std: Optional[float] = None, spec: str = ".2f") -> str:
    if mean is None:
        return "n/a"
    # a signed spec ("+.2f") is for the mean only: a spread has no sign
    return format(mean, spec) + ("" if std is None else f" +- {format(std, spec.lstrip('+'))}")


def summarize(records: list[dict]) -> dict:
    """{setting: {method: summary}} with per-score mean/std and paired differences against InfoNCE."""
    out: dict = {}
    for setting in dict.fromkeys(r["setting"] for r in records):
        rows = [r for r in records if r["setting"] == setting and r["finished"]]
        base = {r["seed"]: r for r in rows if r["method"] == "infonce"}
        out[setting] = {}
        for method in dict.fromkeys(r["method"] for r in records if r["setting"] == setting):
            mine = [r for r in rows if r["method"] == method]
            planned = [r for r in records if r["setting"] == setting and r["method"] == method]
            summary = {"label": planned[0]["label"], "seeds": [r["seed"] for r in mine],
                       "missing_seeds": [r["seed"] for r in planned if not r["finished"]]}
            for key, _ in SCORES:
                summary[key] = mean_std([r["scores"][key] for r in mine if key in r["scores"]])
                diffs = [r["scores"][key] - base[r["seed"]]["scores"][key] for r in mine
                         if r["seed"] in base and key in r["scores"]]
                summary[f"{key}_diff"] = {"per_seed": diffs, "mean_std": mean_std(diffs),
                                          "wins": sum(d > 0 for d in diffs), "n": len(diffs)}
            summary["best_step"] = mean_std([r["best_step"] for r in mine if r["best_step"] is not None])
            summary["before"] = mean_std([r["before"] for r in mine if r["before"] is not None])
            summary["sentences_per_s"] = mean_std([r["sentences_per_s"] for r in mine if r["sentences_per_s"]])
            summary["mechanisms"] = {k: mean_std([r["mechanisms"][k] for r in mine if k in r["mechanisms"]])
                                     for k in MECHANISMS if any(k in r["mechanisms"] for r in mine)}
            out[setting][method] = summary
    return out


def tables(summary: dict, plots: dict[str, list[str]], config: dict) -> str:
    lines = [f"Steps per run: {config.get('steps')}, batch {config.get('batch_size')}, STS-B dev every "
             f"{config.get('eval_every')} steps, seeds {config.get('seeds')}. Spearman x100; mean +- sample std "
             f"over seeds; differences are paired per seed against InfoNCE (wins = seeds where the method is "
             f"higher)."]
    for setting, methods in summary.items():
        lines += ["", f"### Setting `{setting}`", "",
                  "| method | seeds | before | " + " | ".join(label for _, label in SCORES)
                  + " | best step | sentences/s |", "|---" * (len(SCORES) + 5) + "|"]
        for method, s in methods.items():
            missing = f" (missing {s['missing_seeds']})" if s["missing_seeds"] else ""
            cells = [fmt(*s[key]) for key, _ in SCORES]
            lines.append(f"| {s['label']} | {len(s['seeds'])}{missing} | {fmt(*s['before'])} | " + " | ".join(cells)
                         + f" | {fmt(*s['best_step'], spec='.0f')} | {fmt(s['sentences_per_s'][0], spec='.1f')} |")
        lines += ["", "Paired differences against InfoNCE (method - InfoNCE, same seed):", "",
                  "| method | " + " | ".join(label for _, label in SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
        for method, s in methods.items():
            if method == "infonce":
                continue
            cells = []
            for key, _ in SCORES:
                d = s[f"{key}_diff"]
                cells.append(f"{fmt(*d['mean_std'], spec='+.2f')} ({d['wins']}/{d['n']} seeds higher)")
            lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
        keys = [k for k in MECHANISMS if any(k in s["mechanisms"] for s in methods.values())]
        lines += ["", "Mechanism metrics at the last logged step (mean over seeds):", "",
                  "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for s in methods.values():
            lines.append(f"| {s['label']} | " + " | ".join(fmt(s["mechanisms"].get(k, (None,))[0], spec=".3f")
                                                          for k in keys) + " |")
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots.get(setting, [])]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], summary: dict, folder: Path) -> dict[str, list[str]]:
    """Per setting: mean STS-B dev over steps per method, and the per-seed paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    for setting, methods in summary.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for method, s in methods.items():
            runs = [r for r in records if r["setting"] == setting and r["method"] == method and r["evals"]]
            steps = sorted({st for r in runs for st, _ in r["evals"]})
            means = [statistics.mean([v for r in runs for st, v in r["evals"] if st == step]) for step in steps]
            ax.plot(steps, means, marker="o", ms=3, label=s["label"])
        ax.set(xlabel="optimizer step", ylabel="STS-B dev Spearman x100 (mean over seeds)", title=setting)
        ax.legend(fontsize=7)
        fig.tight_layout()
        curve = folder / f"fidelity_{setting}_stsb_dev.png"
        fig.savefig(curve, dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, len(SCORES), figsize=(12, 4.5), sharey=True)
        others = [m for m in methods if m != "infonce"]
        for ax, (key, label) in zip(axes, SCORES):
            for y, method in enumerate(others):
                diffs = methods[method][f"{key}_diff"]["per_seed"]
                ax.scatter(diffs, [y] * len(diffs), s=18)
                if diffs:
                    ax.plot([statistics.mean(diffs)] * 2, [y - 0.3, y + 0.3], color="black")
            ax.axvline(0.0, color="grey", lw=0.8)
            ax.set(title=label, xlabel="method - InfoNCE (points)")
        axes[0].set_yticks(range(len(others)), [methods[m]["label"] for m in others], fontsize=7)
        fig.tight_layout()
        paired = folder / f"fidelity_{setting}_paired.png"
        fig.savefig(paired, dpi=110)
        plt.close(fig)
        written[setting] = [curve.name, paired.name]
    return written


def write_report(runs: list[dict], output: Path, config: dict, publish: Optional[str] = None) -> dict:
    """results.json, results.md and plots under ``output``; with ``publish``, also that folder's
    fidelity.md results section (between the markers) and its plots."""
    records = [read_run(r) for r in runs]
    summary = summarize(records)
    plots = plot(records, summary, output / "plots")
    (output / "results.md").write_text(tables(summary, {s: [f"plots/{p}" for p in ps] for s, ps in plots.items()},
                                              config), encoding="utf-8")
    config = {k: v for k, v in config.items() if isinstance(v, (str, int, float, list, bool, type(None)))}
    (output / "results.json").write_text(json.dumps({"config": config, "summary": summary, "runs": records},
                                                    indent=2, default=str), encoding="utf-8")
    if publish:
        docs = Path(publish)
        for names in plots.values():
            for name in names:
                shutil.copy(output / "plots" / name, docs / name)
        page = docs / "fidelity.md"
        text = page.read_text(encoding="utf-8")
        if START not in text or END not in text:
            raise SystemExit(f"error: {page} has no {START} ... {END} section to fill")
        head, rest = text.split(START, 1)
        body = tables(summary, plots, config)
        page.write_text(f"{head}{START}\n{body}{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    return summary
