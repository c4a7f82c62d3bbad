"""What every stage's command line shares: the params file and ``-S key=value`` overrides."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

from ssd.util.params import DEFAULT_PARAMS, load_settings
from ssd.util.settings import Settings


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: %(default)s)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, like `dvc exp run -S` (repeatable)")


def add_path_options(parser: argparse.ArgumentParser, **options: tuple[Path, str]) -> None:
    """One ``--name PATH`` option per keyword (``run_file`` is ``--run-file``): its workspace default
    and what it names."""
    for name, (default, what) in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=str(default), help=f"{what} (default: %(default)s)")


def settings(args: argparse.Namespace, keys: Iterable[str]) -> Settings:
    """The params file named by ``args`` with its overrides, as typed settings declaring only ``keys``."""
    return load_settings(args.params, args.set, keys)
