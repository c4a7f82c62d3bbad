"""The kinds of failure an ``ssd`` command reports; ``ssd.cli`` maps each to its exit status.

A stage raises ``ValueError``/``OSError``/``RuntimeError`` for refused input or a failed check
(exit 1: retrying the same thing gives the same answer) and :class:`TransientError` when the outside
world failed and the same command may succeed later (exit 75, ``EX_TEMPFAIL``: a server that is
unreachable or answers 5xx after the command's own bounded retries). The flow retries on 75 alone.
"""
from __future__ import annotations


class TransientError(RuntimeError):
    """A failure that may go away on its own (network, a tracking or download server): exit 75."""


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
