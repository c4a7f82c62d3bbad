"""Benchmarks of the ``ssd`` package against the seed's own code; not part of the package.

They need the ``d2l`` package, which is not a dependency (its own pins clash with ours)::

    pip install -e '.[bench]' && pip install --no-deps d2l==1.0.3
    python -m benchmarks.bench [--smoke]
"""
from __future__ import annotations

import sys
from types import ModuleType

INSTALL = "pip install -e '.[bench]' && pip install --no-deps d2l==1.0.3"


def require_d2l() -> ModuleType:
    """``d2l.torch``, or exit 1 with one line saying what is missing and how to install it."""
    try:
        import d2l.torch
    except ImportError as exc:
        sys.exit(f"benchmarks: the seed's code needs the d2l package, which cannot be imported ({exc}); "
                 f"install it with: {INSTALL}")
    return d2l.torch
