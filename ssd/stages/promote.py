"""``ssd promote --version N``: point the ``champion`` alias at a registered version by hand."""
from __future__ import annotations

import argparse
import json

from ssd.mlops.registry import promote
from ssd.stages import common

PARAMS = ("registry.model_name",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", required=True, type=int, help="registered version to make champion")
    parser.add_argument("--name", default=None, help="registered model (default: params registry.model_name)")
    common.add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    name = args.name or common.settings(args, PARAMS).registry.model_name
    print(json.dumps(promote(name, args.version), indent=2))
    return 0
