"""The kinds of failure an ``ssd`` command reports, and the exit status of each (one mapping).

==  ==========================================================================================
0   success
1   refused input or a failed check (``ValueError``, ``OSError``, ``RuntimeError``, an MLflow
    error that is not transient): a one-line message on stderr; running it again will not help
2   usage: an unknown command or option, a missing argument (argparse)
75  transient failure (``EX_TEMPFAIL``, :class:`TransientError`): a server unreachable, a
    connection lost, or HTTP 5xx/429 after the command's own bounded retries; the same command
    may succeed later, and the retraining flow retries a stage on this code alone
130 stopped by SIGINT (Ctrl-C), 143 by SIGTERM (a Prefect Cancel, ``kill``): 128 + the signal, as
    shells report it. The command stopped cleanly (:class:`Interrupted`): locks freed, the MLflow
    run ended as KILLED, checkpoints kept; running it again resumes
==  ==========================================================================================

When ``SSD_EXIT_STATUS_FILE`` (:data:`EXIT_STATUS_ENV`) is set, ``ssd`` also writes its status
there (the retraining flow sets it: ``dvc repro`` exits 255 whatever the status of the command it ran).
"""
from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TEMPFAIL = 0, 1, 2, 75
EXIT_STATUS_ENV = "SSD_EXIT_STATUS_FILE"


class TransientError(RuntimeError):
    """A failure that may go away on its own (network, a tracking or download server): exit 75."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived (raised from the signal handler ``ssd.cli`` installs): exit 128 + signal.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` swallows it, every
    ``finally`` and context manager on the way out runs."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


# Error codes only a server that is failing or overloaded answers with (HTTP 5xx, 429).
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """Whether an MLflow error may go away when retried later: the request never got an answer
    (refused or lost connection, timeout, MLflow's HTTP retries exhausted on 5xx/429: MLflow wraps
    the ``requests`` error) or the server answered that it is failing (a REST error with a 5xx/429
    code). Anything else (a refused value, "does not exist", a broken model) is not."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TransientError, requests.RequestException, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, RestException) and exc.error_code in _TRANSIENT_CODES:
            return True
        if not isinstance(exc, MlflowException):
            return False
        exc = exc.__cause__ or exc.__context__  # MLflow raises its own error inside the except block
    return False


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
