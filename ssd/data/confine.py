"""A dataset folder never leads outside itself: symlinks out of a source folder, and ``img_name``
values that name a path outside a split's ``images/``.

Two rules, for two kinds of folder:

* A **source folder** (``ssd fetch --source DIR``, ``ssd source``) is someone else's: every symlink in
  it, to a file or a folder, must resolve inside it, or the whole folder is refused in one line naming
  the link and its target. A link to a place inside the folder is followed (its bytes are copied as a
  plain file, and are hashed at their own place in the folder); the folder named on the command line
  may itself be a link (the user named it).
* A **dataset being read** (``data/raw``, or any folder given to validate, train or evaluate): an
  ``img_name`` is a path relative to ``images/``; an absolute one or one with a ``..`` part is refused.
  Links there are not judged: fetch writes none, and DVC's ``symlink`` cache type makes every file of
  ``data/raw`` a link into ``.dvc/cache``.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

_PARTS = re.compile(r"[\\/]")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_link(path: Path, root: Path) -> None:
    """``ValueError`` naming ``path`` and its target when it is a symlink resolving outside ``root``
    (``root`` as resolved by ``os.path.realpath``)."""
    if os.path.islink(path):
        target = os.path.realpath(path)
        if not _inside(target, str(root)):
            raise ValueError(f"{path} is a symlink to {target}, outside the source folder {root}: refusing the "
                             f"folder (a dataset folder must not lead outside itself; copy the file in instead)")


def source_files(root: str | Path) -> Iterator[Path]:
    """Every regular file under the source folder ``root`` (symlinks to files inside it included), in
    no particular order; ``ValueError`` at the first symlink, to a file or a folder, that leads outside
    it. Linked folders are not descended into: what they hold inside ``root`` is met at its own place."""
    real = Path(os.path.realpath(root))
    for folder, dirs, files in os.walk(real, followlinks=False):
        for name in dirs + files:
            check_link(Path(folder) / name, real)
        yield from (Path(folder) / name for name in files if os.path.isfile(Path(folder) / name))


def open_inside(path: Path, root: Path) -> BinaryIO:
    """``path`` opened for reading, after checking that it resolves inside ``root`` (resolved) and is a
    regular file; the resolved path is opened without following a link, so a link swapped in after
    the check is not followed either. ``ValueError`` otherwise."""
    check_link(path, root)
    real = os.path.realpath(path)
    if not _inside(real, str(root)):  # a linked folder on the way out
        raise ValueError(f"{path} resolves to {real}, outside the source folder {root}: refusing the folder")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file: refusing the folder")
    return os.fdopen(fd, "rb")


def outside_images(name: str) -> bool:
    """Whether an ``img_name`` names a path outside ``images/``: absolute (``/x``, ``\\x``, ``C:x``) or
    with a ``..`` part (either slash). Plain string tests: validate asks it of every row."""
    return (name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha())
            or ".." in _PARTS.split(name))
