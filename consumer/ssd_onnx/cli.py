"""``ssd-onnx predict MODEL IMAGE... [--threshold T] [--json OUT] [--batch-size N]``.

MODEL is an ONNX file (``ssd export``'s) or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``
(extra ``[registry]``, ``MLFLOW_TRACKING_URI``: the version's ONNX file, ``ssd_onnx.registry``).
Prints ``ssd predict``'s JSON: one record per image, boxes in pixels of the image as displayed, and a
``model`` block naming the model (name, version, alias, run, classes, from the file's metadata);
``--json OUT`` writes it to OUT (atomically) instead. An image that cannot be read is reported on
stderr and skipped (exit 1 at the end). Exit codes as ``ssd``'s: 0 ok, 1 refused, 2 usage, 75 the
registry unreachable or failing. No torch and no ``ssd`` are imported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_TEMPFAIL = 0, 1, 75


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd-onnx", description="Detect with a TinySSD ONNX file on onnxruntime")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = sub.add_parser("predict", help="detect objects in images",
                             description="Detect objects in images with a TinySSD ONNX file (onnxruntime, no torch); "
                                         "prints ssd predict's JSON")
    predict.add_argument("model", metavar="MODEL", help="an .onnx file, models:/<name>@<alias> or models:/<name>/<version>")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    predict.add_argument("--threshold", type=float, default=None,
                         help="minimum score of a reported box (default: the model's)")
    predict.add_argument("--json", default=None, metavar="OUT", help="write the JSON here instead of stdout")
    predict.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call (default 32)")
    return parser


def _open(model: str, tmp: str) -> Any:
    from ssd_onnx import registry
    from ssd_onnx.model import load

    if not registry.is_registry_uri(model):
        return load(model)
    path, source = registry.fetch(model, tmp)
    loaded = load(path)
    registry.check_names(loaded.block, source, model)
    return loaded._replace(block={**loaded.block, "uri": model, "alias": source["alias"]})


def _write(results: list[dict[str, Any]], out: str | None) -> None:
    text = json.dumps(results, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    target = Path(out)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def predict(args: argparse.Namespace) -> int:
    from ssd_onnx.model import predict_files

    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold}: expected a number in [0, 1]")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if args.json is not None and not Path(args.json).parent.is_dir():
        raise ValueError(f"--json {args.json}: no such folder {Path(args.json).parent}")
    failed: list[str] = []

    def report(message: str) -> None:
        failed.append(message)
        print(f"ssd-onnx predict: skipped {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="ssd-onnx-") as tmp:
        model = _open(args.model, tmp)
    results = predict_files(model, args.images, args.threshold, args.batch_size, on_error=report)
    _write(results, args.json)
    if failed:
        print(f"ssd-onnx predict: error: {len(failed)} input(s) skipped, {len(results)} image(s) predicted",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from ssd_onnx.registry import Unreachable

    args = _parser().parse_args(argv)
    try:
        return predict(args)
    except Unreachable as exc:
        print(f"ssd-onnx {args.command}: transient error: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except (ValueError, OSError) as exc:
        print(f"ssd-onnx {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
