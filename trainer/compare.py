"""`python -m trainer compare --experiment NAME [--tracking-uri URI] [--output DIR]`: the runs of an MLflow
experiment side by side: a markdown + CSV table (method, key params, final / best STS-B dev, throughput) and
PNG plots (train loss, STS-B dev over steps, per-task STS bars). MLflow access goes through `tracking`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from trainer import tracking
from trainer.errors import UserError

COLUMNS = (
    ("run", lambda r: r["name"]),
    ("method", lambda r: _method(r["params"])),
    ("lr", lambda r: r["params"].get("optim.lr", "")),
    ("global batch", lambda r: r["params"].get("global_batch", r["params"].get("data.batch_size", ""))),
    ("tau", lambda r: r["params"].get("loss.temperature", "")),
    ("gamma", lambda r: r["params"].get("loss.gamma", "") if r["params"].get("loss.name") == "softcse" else ""),
    ("twins w", lambda r: r["params"].get("loss.twins_weight", "") if r["params"].get("loss.name") == "iftcl" else ""),
    ("queue", lambda r: r["params"].get("loss.queue_size", "")),
    ("steps", lambda r: r["steps"]),
    ("STS-B dev final", lambda r: _fmt(r["final"])),
    ("STS-B dev best", lambda r: _fmt(r["best"])),
    ("sentences/s", lambda r: _fmt(r["metrics"].get("throughput/sentences_per_s"), 1)),
    ("status", lambda r: r["status"]),
)


def _method(params: dict) -> str:
    name = params.get("loss.name", "?")
    if name == "softcse":
        return f"softcse-{params.get('loss.softcse_mode', 'weight')}"
    if name == "iftcl" and params.get("loss.contrastive") == "softcse":
        return "iftcl-softcse"
    return name


def _fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def stores(location: str) -> list[str]:
    """Tracking URIs for a URI, a mlflow.db, a run folder, or a folder of run folders (each its own store)."""
    path = Path(location)
    if "://" not in location and path.is_dir() and not (path / "mlflow.db").is_file():
        found = sorted(path.glob("**/mlflow.db"))
        if found:
            return [tracking.uri_from_location(str(p)) for p in found]
    return [tracking.uri_from_location(location)]


def collect(experiment: str, uri: str) -> list[dict]:
    """Runs with their histories of train/loss and eval/stsb_dev attached."""
    runs = tracking.list_runs(experiment, uri)
    for run in runs:
        run["uri"] = uri
        run["loss"] = tracking.metric_history(run["run_id"], "train/loss", uri)
        run["stsb"] = tracking.metric_history(run["run_id"], "eval/stsb_dev", uri)
        run["final"] = run["stsb"][-1][1] if run["stsb"] else None
        run["best"] = max(v for _, v in run["stsb"]) if run["stsb"] else None
        run["steps"] = run["loss"][-1][0] if run["loss"] else 0
        run["sts"] = {k[4:]: v for k, v in run["metrics"].items() if k.startswith("sts/")}
    return runs


def markdown_table(runs: list[dict]) -> str:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(str(fn(r)) for _, fn in COLUMNS) + " |" for r in runs]
    return "\n".join([header, rule, *rows])


def write_csv(runs: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([name for name, _ in COLUMNS] + ["run_id"])
        for r in runs:
            writer.writerow([fn(r) for _, fn in COLUMNS] + [r["run_id"]])


def plot(runs: list[dict], output: Path, experiment: str) -> list[Path]:
    """loss.png, stsb_dev.png and (when runs logged final STS tables) sts_tasks.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, title, ylabel, name in (
        ("loss", "Training loss", "train/loss (mean over the logging window)", "loss.png"),
        ("stsb", "STS-B dev during training", "Spearman x100", "stsb_dev.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in runs:
            if r[key]:
                steps, values = zip(*r[key])
                ax.plot(steps, values, marker="o" if key == "stsb" else None, ms=3, label=f"{r['name']} ({_method(r['params'])})")
        ax.set(title=f"{title}: {experiment}", xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(output / name, dpi=120)
        plt.close(fig)
        written.append(output / name)
    with_sts = [r for r in runs if r["sts"]]
    if with_sts:
        tasks = sorted({t for r in with_sts for t in r["sts"]})
        width = 0.8 / len(with_sts)
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks) * max(1, len(with_sts) / 2)), 4.5))
        for i, r in enumerate(with_sts):
            xs = [j + i * width for j in range(len(tasks))]
            bars = ax.bar(xs, [r["sts"].get(t, 0.0) for t in tasks], width, label=r["name"])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)  # differences of a point are invisible at this scale
        ax.set_xticks([j + width * (len(with_sts) - 1) / 2 for j in range(len(tasks))], tasks)
        ax.set(title=f"Final STS (Spearman x100): {experiment}", ylabel="Spearman x100")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(output / "sts_tasks.png", dpi=120)
        plt.close(fig)
        written.append(output / "sts_tasks.png")
    return written


def compare(experiment: str, uri: str | list[str], output: str | Path) -> tuple[str, list[Path]]:
    uris = [uri] if isinstance(uri, str) else list(uri)
    runs: list[dict] = []
    errors = []
    for one in uris:  # runs of the same experiment may live in several embedded stores: merge them
        try:
            runs += collect(experiment, one)
        except UserError as exc:
            errors.append(str(exc))
    if not runs:
        raise UserError(errors[0] if len(uris) == 1 and errors else f"experiment {experiment!r} has no runs in {', '.join(uris)}")
    runs.sort(key=lambda r: r["start_time"] or 0)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (output / "runs.md").write_text(f"# {experiment}\n\n{table}\n", encoding="utf-8")
    write_csv(runs, output / "runs.csv")
    files = [output / "runs.md", output / "runs.csv", *plot(runs, output, experiment)]
    return table, files
