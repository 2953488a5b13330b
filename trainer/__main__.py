"""`python -m trainer <train|shard|evaluate|compare|export>` (also the `trainer` console script)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> (module, help). Each module exposes add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "train": ("trainer.cli_train", "train an encoder from a run YAML (+ key.sub=value overrides)"),
    "shard": ("trainer.shards", "text / .gz / jsonl corpus -> webdataset .tar shards + manifest.json"),
    "evaluate": ("trainer.evaluate", "STS12-16, STS-B, SICK-R Spearman x100 of a model or checkpoint"),
    "compare": ("trainer.compare", "compare the MLflow runs of an experiment: table + plots"),
    "export": ("trainer.export", "checkpoint -> folder that sentence_transformers.SentenceTransformer loads"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Import only the chosen command's module: `trainer shard` should not pay for MLflow or matplotlib.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():  # else DeepSpeed (imported by transformers) warns on every start
            os.environ["DS_ACCELERATOR"] = "cpu"
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Accelerate logs every file of every checkpoint at INFO; keep the console for progress and results.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from trainer.errors import UserError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
