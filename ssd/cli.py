"""The ``ssd`` command: one subcommand per stage module.

Each module named in ``COMMANDS`` provides ``add_arguments(parser)`` and ``main(args)``; the CLI
holds no logic. Only the chosen module is imported, so ``ssd --help`` stays fast.

Exit codes, the same for every command (:func:`exit_code` is the one mapping):

==  ==========================================================================================
0   success
1   refused input or a failed check (``ValueError``, ``OSError``, ``RuntimeError``, an MLflow
    error that is not transient): a one-line message on stderr; running it again will not help
2   usage: an unknown command or option, a missing argument (argparse)
75  transient failure (``EX_TEMPFAIL``, ``ssd.errors.TransientError``): a server unreachable, a
    connection lost, or HTTP 5xx/429 after the command's own bounded retries; the same command
    may succeed later, and the retraining flow retries a stage on this code alone
==  ==========================================================================================

When ``SSD_EXIT_STATUS_FILE`` is set, the status is also written there (the retraining flow sets
it: ``dvc repro`` exits 255 whatever the status of the command it ran).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import TransientError, is_transient

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TEMPFAIL = 0, 1, 2, 75
EXIT_STATUS_ENV = "SSD_EXIT_STATUS_FILE"

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


def exit_code(exc: BaseException) -> int | None:
    """The exit status for a stage's exception (module docstring), or None for a bug (re-raised).

    MLflow and ``requests`` are asked about only when already imported: an exception of theirs
    cannot exist otherwise, and ``ssd --help`` stays fast.
    """
    if isinstance(exc, TransientError):
        return EXIT_TEMPFAIL
    mlflow_errors = sys.modules.get("mlflow.exceptions")
    if mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException):
        return EXIT_TEMPFAIL if is_transient(exc) else EXIT_FAILED
    requests_errors = sys.modules.get("requests.exceptions")
    if requests_errors is not None and isinstance(exc, requests_errors.RequestException):
        return EXIT_TEMPFAIL  # a connection, timeout or retry failure talking to a server
    if isinstance(exc, (ValueError, OSError, RuntimeError)):
        return EXIT_FAILED
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (module docstring)."""
    try:
        code = _main(argv)
    except SystemExit as exc:  # argparse: usage (2) or --help (0)
        _report(exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else EXIT_FAILED)
        raise
    _report(code)
    return code


def _report(code: int) -> None:
    path = os.environ.get(EXIT_STATUS_ENV)
    if path:
        from .files import atomic_write_text

        atomic_write_text(path, f"{code}\n")


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = get_parser(command if command in COMMANDS else None).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    run = getattr(module, f"{args.command}_main", None) or module.main
    try:
        return int(run(args) or EXIT_OK)
    except Exception as exc:
        code = exit_code(exc)
        if code is None or os.environ.get("SSD_DEBUG"):
            raise
        kind = "transient error (retry later)" if code == EXIT_TEMPFAIL else "error"
        print(f"ssd {args.command}: {kind}: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
