"""``ssd source``: fingerprint the data source; ``data/source.json`` is rewritten only when it changed.

The always-run DVC stage before ``fetch``: fetch depends on that file, so DVC reruns it exactly when
the source's content changed (``ssd.data.source.check_source``).
"""
from __future__ import annotations

import argparse

from ssd.data.layout import RAW_DIR, SOURCE_FILE
from ssd.data.source import check_source
from ssd.stages.common import add_params_arguments, add_path_options, settings

PARAMS = ("data.source", "data.url", "data.synthetic", "data.image_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="as for `ssd fetch` (default: params data.source)")
    add_path_options(parser, out=(SOURCE_FILE, "fingerprint file"),
                     data=(RAW_DIR, "the fetched dataset, to compare with"))
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    result = check_source(args.source, settings(args, PARAMS).data, args.out, args.data)
    print(f"{result['change']}; {args.out} " + ("written" if result["written"] else "unchanged"))
    return 0
