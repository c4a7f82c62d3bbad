"""The ``ssd`` command: one subcommand per stage module.

Each module named in ``COMMANDS`` provides ``add_arguments(parser)`` and ``main(args)``; the CLI
holds no logic. Only the chosen module is imported, so ``ssd --help`` stays fast.
Exit codes: 0 success, 1 a refused input or failed check (message on stderr), 2 bad usage.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "source": ("ssd.fetch", "fingerprint the data source (rewritten only when it changed)"),
    "fetch": ("ssd.fetch", "download (or generate) the banana dataset and extract it"),
    "validate": ("ssd.validate", "check every image and label row; write the validation report"),
    "train": ("ssd.train", "train TinySSD (same code under python and torchrun)"),
    "evaluate": ("ssd.evaluate", "mAP, precision/recall and pictures on the validation split"),
    "register": ("ssd.registry", "log the model to MLflow, register it and move aliases"),
    "promote": ("ssd.registry", "point the champion alias at a registered version"),
    "predict": ("ssd.predict", "detect bananas in images"),
}


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, like `dvc exp run -S` (repeatable)")


def get_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s own arguments are loaded (all are, for its help)."""
    parser = argparse.ArgumentParser(prog="ssd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            add = getattr(importlib.import_module(module), f"add_{name}_arguments", None) or \
                importlib.import_module(module).add_arguments
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = get_parser(command if command in COMMANDS else None).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    run = getattr(module, f"{args.command}_main", None) or module.main
    try:
        return int(run(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("SSD_DEBUG"):
            raise
        print(f"ssd {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
