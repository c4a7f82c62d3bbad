"""``ssd source``: fingerprint the data source; ``data/source.json`` is rewritten only when it changed.

The always-run DVC stage before ``fetch``: fetch depends on that file, so DVC reruns it exactly when
the source's content changed (``ssd.data.source.check_source``).
"""
from __future__ import annotations

import argparse

from ssd.data.layout import RAW_DIR, SOURCE_FILE
from ssd.data.source import check_source
from ssd.stages.common import add_params_arguments, settings

PARAMS = ("data.source", "data.url", "data.synthetic", "data.image_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="as for `ssd fetch` (default: params data.source)")
    parser.add_argument("--out", default=str(SOURCE_FILE), help="fingerprint file (default: %(default)s)")
    parser.add_argument("--data", default=str(RAW_DIR), help="the fetched dataset, to compare with (default: %(default)s)")
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    result = check_source(args.source, settings(args, PARAMS).data, args.out, args.data)
    print(f"{result['change']}; {args.out} " + ("written" if result["written"] else "unchanged"))
    return 0
