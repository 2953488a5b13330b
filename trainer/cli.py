"""`python -m trainer <train|shard|evaluate|compare|export|tracking>` (also the `trainer` console script).

One parser; one `cmd_*` function per subcommand. Each command imports its library modules when it runs, so
`trainer shard` does not pay for MLflow, matplotlib or transformers, and `--help` / `--version` stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.evaluate import TASKS

DISTRIBUTION = "contrastive-trainer"


def version() -> str:
    """The installed distribution's version; `trainer.__version__` (what setup.py reads) in a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        from trainer import __version__

        return __version__


class _VersionAction(argparse.Action):
    # argparse's own "version" action formats its string when the parser is built; this asks only when used.
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"trainer {version()}")
        parser.exit()


# ----------------------------------------------------------------------------------------------------------
# train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run YAML (launch_configs/runs/*.yaml); defaults if omitted")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the last checkpoint in output_dir (or from the given checkpoint folder)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key with its doc and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar nor progress lines (TQDM_DISABLE=1 silences the bars only)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, describe, load_config

    # `--resume key=value ...`: argparse hands the first override to --resume's optional folder argument.
    if isinstance(args.resume, str) and "=" in args.resume:
        args.overrides.insert(0, args.resume)
        args.resume = True
    if args.list_keys:
        for key, default, doc in describe():
            print(f"{key} = {default}\n    {doc}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.print_config:
        import yaml

        from trainer.config import to_dict
        from trainer.redact import redact_values

        print(yaml.safe_dump(redact_values(to_dict(cfg)), sort_keys=False))
        return 0
    from trainer.engine import train

    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------------------------------------
# shard


def _shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="FILE_OR_GLOB",
                        help="text (one sentence a line), .gz text or .jsonl file, or a glob; repeatable")
    parser.add_argument("--format", choices=("text", "pairs"), default="text",
                        help="text: one sentence a sample; pairs: jsonl lines {anchor, positive, negatives: [...]}")
    parser.add_argument("--anchor-field", default=None, help="pairs: JSON field of the anchor (default 'anchor')")
    parser.add_argument("--positive-field", default=None,
                        help="pairs: JSON field of the positive (default 'positive')")
    parser.add_argument("--negatives-field", default=None,
                        help="pairs: JSON field of the hard negatives, a list or one string (default 'negatives')")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for shard-*.tar + manifest.json")
    # None: build_shards' own default (the parser does not import the data package for it).
    parser.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    parser.add_argument("--field", default=None,
                        help="JSON field holding the sentence (default 'text'); giving it reads every input as jsonl")
    parser.add_argument("--workers", type=int, default=1, help="writer processes (output is identical for any)")
    parser.add_argument("--dedup", action="store_true",
                        help="drop exact duplicate sentences (pairs: repeated anchor + positive), after stripping")
    parser.add_argument("--min-chars", type=int, default=1, help="drop shorter sentences")
    parser.add_argument("--max-chars", type=int, default=None, help="drop longer sentences")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_shard(args: argparse.Namespace) -> int:
    from trainer.data import PairFields, build_shards, skip_summary

    given = {"shard_size": args.shard_size, "max_chars": args.max_chars}
    names = {"anchor": args.anchor_field, "positive": args.positive_field, "negatives": args.negatives_field}
    pair_fields = None
    if any(v is not None for v in names.values()):
        pair_fields = PairFields(**{k: v for k, v in names.items() if v is not None})
    manifest = build_shards(
        args.input,
        args.output,
        field=args.field,
        workers=args.workers,
        dedup=args.dedup,
        min_chars=args.min_chars,
        progress=not args.no_progress,
        format=args.format,
        pair_fields=pair_fields,
        **{k: v for k, v in given.items() if v is not None},
    )
    what = "pairs" if args.format == "pairs" else "sentences"
    print(f"wrote {manifest['num_samples']} {what} in {manifest['num_shards']} shards to {args.output} "
          f"({manifest['num_lines']} lines read; skipped: {skip_summary(manifest)})")
    if args.format == "pairs":
        print(f"hard negatives: {manifest['num_negatives']} kept ({manifest['pairs_with_negatives']} pairs have "
              f"some, at most {manifest['max_negatives']} a pair), {manifest['negatives_dropped']} dropped")
    return 0


# ----------------------------------------------------------------------------------------------------------
# evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint / best / export folder, or an HF model name")
    parser.add_argument("--sts-dir", required=True, help="SentEval-layout folder (STSBenchmark/, SICK/, STS12-en-test/ ...)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="default: every task found")
    parser.add_argument("--pooling", choices=("cls", "mean", "cls_mlp"), help="override the saved pooler")
    parser.add_argument("--aggregation", choices=("all", "wmean"), default="all", help="STS12-16 aggregation")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", help="JSON file for the results (default: <model>/sts_results.json if a folder)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from trainer.evaluate import evaluate_sts, format_table

    results = evaluate_sts(
        args.model,
        args.sts_dir,
        tasks=args.tasks,
        pooling=args.pooling,
        batch_size=args.batch_size,
        aggregation=args.aggregation,
    )
    if not results:
        raise UserError(f"no STS task files found under {args.sts_dir}")
    print(format_table(results))
    output = Path(args.output) if args.output else (Path(args.model) / "sts_results.json" if Path(args.model).is_dir() else None)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2))
        print(f"wrote {output}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# compare


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument(
        "--tracking-uri",
        help="tracking URI (http://..., sqlite:///...), a mlflow.db file, a run folder, or a folder of run "
        "folders (their stores are merged); default $MLFLOW_TRACKING_URI",
    )
    parser.add_argument("--output", default=None, help="folder for runs.md, runs.csv and the PNGs (default compare/<experiment>)")


def cmd_compare(args: argparse.Namespace) -> int:
    location = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not location:
        raise UserError("give --tracking-uri (a server URI, a mlflow.db file or a run folder) or set MLFLOW_TRACKING_URI")
    from trainer.compare import compare, stores

    table, files = compare(args.experiment, stores(location), args.output or Path("compare") / args.experiment)
    print(table)
    print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


# ----------------------------------------------------------------------------------------------------------
# export


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run's best/ folder, a checkpoints/step_N folder, or a saved model")
    parser.add_argument("--output", required=True,
                        help="folder to write; an existing one is replaced only if empty or an earlier export")
    parser.add_argument("--overwrite", action="store_true", help="replace --output whatever it holds")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="then upload the folder to this Hugging Face Hub model repo (user/name; created if missing)")


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export

    path = export(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"exported to {path}; load it with sentence_transformers.SentenceTransformer({str(path)!r})")
    if args.push_to_hub:
        from trainer.export import push_to_hub

        print(f"pushed to {push_to_hub(path, args.push_to_hub)}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# tracking


def _tracking_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    replay = actions.add_parser("replay", help="send a run's spooled MLflow records (mlflow_fallback.jsonl)",
                                description="send a run's spooled MLflow records (mlflow_fallback.jsonl)")
    replay.add_argument("--output-dir", required=True, help="the run's output_dir")
    replay.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the run's own tracking.uri")


def cmd_tracking(args: argparse.Namespace) -> int:
    from trainer.redact import redact
    from trainer.tracking import FALLBACK_FILE, replay_fallback, replay_uri

    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is not a folder")
    if not (output_dir / FALLBACK_FILE).is_file():
        print(f"nothing to replay: no {FALLBACK_FILE} in {output_dir}")
        return 0
    uri = replay_uri(output_dir, args.tracking_uri)
    sent = replay_fallback(output_dir, uri)
    print(f"sent {sent} records to MLflow at {redact(uri)}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# entry point

COMMANDS = (
    ("train", "train an encoder from a run YAML (+ key.sub=value overrides)", _train_arguments, cmd_train),
    ("shard", "text / .gz / jsonl corpus -> webdataset .tar shards + manifest.json", _shard_arguments, cmd_shard),
    ("evaluate", "STS12-16, STS-B, SICK-R Spearman x100 of a model or checkpoint", _evaluate_arguments, cmd_evaluate),
    ("compare", "compare the MLflow runs of an experiment: table + plots", _compare_arguments, cmd_compare),
    ("export", "checkpoint -> folder that sentence_transformers.SentenceTransformer loads", _export_arguments, cmd_export),
    ("tracking", "MLflow chores: `tracking replay` sends what a run spooled while MLflow was down",
     _tracking_arguments, cmd_tracking),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action=_VersionAction, help="print the installed version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, command in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(command_fn=command)
    return parser


def _set_env_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():  # else DeepSpeed (imported by transformers) warns on every start
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # After parsing (nothing the parser imports reads them), so --help and --version need no torch import.
    _set_env_defaults()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Accelerate logs every file of every checkpoint at INFO; keep the console for progress and results.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # "Saving model to <tmp folder>" on export
    try:
        return int(args.command_fn(args) or 0)
    except UserError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
