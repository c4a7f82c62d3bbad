"""The ``ssd`` command: one subcommand per stage module (``ssd.stages``); the CLI holds no logic.

Each stage module has ``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen stage is
imported, so ``ssd --help`` stays fast. Exit codes (0 ok, 1 refused or failed, 2 usage, 75 transient)
and their mapping from exceptions: ``ssd.util.errors``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from ssd.util.errors import EXIT_FAILED, EXIT_OK, EXIT_STATUS_ENV, EXIT_TEMPFAIL, Interrupted, exit_code


class Command(NamedTuple):
    stage: str   # the stage module that implements it
    help: str


COMMANDS: dict[str, Command] = {
    "source": Command("ssd.stages.source", "fingerprint the data source (rewritten only when it changed)"),
    "fetch": Command("ssd.stages.fetch", "download (or generate) the banana dataset and extract it"),
    "validate": Command("ssd.stages.validate", "check every image and label row; write the validation report"),
    "train": Command("ssd.stages.train", "train TinySSD (same code under python and torchrun)"),
    "evaluate": Command("ssd.stages.evaluate", "mAP, precision/recall and pictures on the validation split"),
    "register": Command("ssd.stages.register", "log the model to MLflow, register it and move aliases"),
    "promote": Command("ssd.stages.promote", "point the champion alias at a registered version"),
    "predict": Command("ssd.stages.predict", "detect bananas in images"),
    "serve": Command("ssd.stages.serve", "answer detection requests over HTTP with the champion, following the alias"),
    "export": Command("ssd.stages.export", "write a model as ONNX (runs on onnxruntime, no torch)"),
}


def get_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s own arguments are loaded."""
    parser = argparse.ArgumentParser(prog="ssd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            importlib.import_module(spec.stage).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (``ssd.util.errors``)."""
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
        from ssd.util.files import atomic_write_text

        atomic_write_text(path, f"{code}\n")


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = get_parser(command if command in COMMANDS else None).parse_args(argv)
    stage = importlib.import_module(COMMANDS[args.command].stage)
    try:
        with _stop_on_signals():
            return int(stage.run(args) or EXIT_OK)
    except Interrupted as exc:
        print(f"ssd {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        code = exit_code(exc)
        if code is None or os.environ.get("SSD_DEBUG"):
            raise
        kind = "transient error (retry later)" if code == EXIT_TEMPFAIL else "error"
        print(f"ssd {args.command}: {kind}: {exc}", file=sys.stderr)
        return code


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread, so the stage unwinds: its
    ``finally`` blocks free locks and end its MLflow run. The previous handlers come back after."""
    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (a test calling main() elsewhere)
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
