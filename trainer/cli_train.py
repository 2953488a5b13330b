"""`python -m trainer train --config RUN.yaml [--resume] [key.sub=value ...]`."""

from __future__ import annotations

import argparse

from trainer.config import ConfigError, describe, load_config
from trainer.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def run(args: argparse.Namespace) -> int:
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

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from trainer.engine import train

    train(cfg, resume=args.resume)
    return 0
