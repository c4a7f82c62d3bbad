"""The kinds of failure an ``ssd`` command reports; ``ssd.cli`` maps each to its exit status.

A stage raises ``ValueError``/``OSError``/``RuntimeError`` for refused input or a failed check
(exit 1: retrying the same thing gives the same answer) and :class:`TransientError` when the outside
world failed and the same command may succeed later (exit 75, ``EX_TEMPFAIL``: a server that is
unreachable or answers 5xx after the command's own bounded retries). The flow retries on 75 alone.
"""
from __future__ import annotations


class TransientError(RuntimeError):
    """A failure that may go away on its own (network, a tracking or download server): exit 75."""
