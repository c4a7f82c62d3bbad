"""``ssd fetch``: download (or generate, or copy) the dataset into ``data/raw``, verified and whole.

Sources and guarantees: ``ssd.data.fetch``. The DVC stage passes ``--fingerprint data/source.json``
(written by ``ssd source``, ``ssd.data.source``) so the manifest records what the source was.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssd.data.fetch import fetch
from ssd.data.layout import DATASET_DIR, MANIFEST, RAW_DIR
from ssd.data.source import read_fingerprint
from ssd.stages.common import add_params_arguments, settings

PARAMS = ("data.source", "data.url", "data.sha1", "data.synthetic", "data.image_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="auto, d2l, synthetic, a URL, a zip or a dataset folder "
                                         "(default: params data.source)")
    parser.add_argument("--sha1", help="expected SHA-1 of the archive (default for d2l/auto: params data.sha1)")
    parser.add_argument("--out", default=str(RAW_DIR), help="output folder (default: %(default)s)")
    parser.add_argument("--fingerprint", metavar="FILE",
                        help="the source's fingerprint written by `ssd source`, recorded in the manifest")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    data = settings(args, PARAMS).data
    fingerprint = None
    if args.fingerprint:
        fingerprint = read_fingerprint(args.fingerprint)
        if fingerprint is None:
            raise FileNotFoundError(f"{args.fingerprint}: no source fingerprint there (run `ssd source` first)")
    manifest = fetch(args.source, args.sha1, args.out, data, progress=not args.quiet, fingerprint=fingerprint)
    files = ", ".join(f"{k}: {v['images']} images / {v['label_rows']} boxes" for k, v in manifest["files"].items())
    digest = f"sha1 {manifest['sha1']}" if manifest["sha1"] else f"tree sha256 {manifest['tree_sha256'][:12]}…"
    print(f"fetched {manifest['resolved_source']} dataset ({digest}) into "
          f"{Path(args.out) / DATASET_DIR}: {files}")
    if manifest["synthetic_fallback"]:
        print(f"NOTE: synthetic fallback (network unreachable); see {MANIFEST}", file=sys.stderr)
    return 0
