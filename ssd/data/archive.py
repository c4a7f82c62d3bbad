"""Safe zip extraction: every member is checked before anything is written.

Refused: absolute or ``..`` members, symlinks and other non-regular files, and archives whose sizes
are absurd (zip bombs): more than :data:`MAX_MEMBERS` members, more than :data:`MAX_TOTAL_BYTES`
unpacked, a member compressed more than :data:`MAX_RATIO` times, or one larger than it declares.
"""
from __future__ import annotations

import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

MAX_TOTAL_BYTES = 4 << 30    # 4 GiB unpacked: the real archive is far smaller
MAX_MEMBERS = 100_000
MAX_RATIO = 200              # uncompressed / compressed per member: beyond it, a zip bomb
CHUNK = 1 << 20


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in path.parts:
        return "'..' in path"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: a plain file
        return "not a regular file"
    if info.file_size > MAX_RATIO * max(info.compress_size, 1) and info.file_size > CHUNK:
        return f"compression ratio {info.file_size / max(info.compress_size, 1):.0f}x (zip bomb?)"
    return None


def archive_problems(members: list[zipfile.ZipInfo]) -> list[str]:
    """Everything unsafe about an archive's members, read from its directory alone."""
    problems = [f"{m.filename!r}: {p}" for m in members if (p := _member_problem(m))]
    total = sum(m.file_size for m in members)
    if len(members) > MAX_MEMBERS:
        problems.append(f"{len(members)} members (more than {MAX_MEMBERS})")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total} bytes unpacked (more than {MAX_TOTAL_BYTES})")
    return problems


def _extract_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    """Write one file member to ``target``, refusing more bytes than its header declares."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with zf.open(member) as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > member.file_size:  # the header lied about the size
                    raise ValueError(f"{archive}: member {member.filename!r} is larger than it declares")
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{archive}: member {member.filename!r} is corrupt ({exc})") from None


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract ``archive`` into ``dest`` after checking every member; returns the number of files.

    Raises ``ValueError`` naming every unsafe member, or the reason the archive cannot be read.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{archive}: not a readable zip archive ({exc}); truncated or corrupt download?") from None
    with zf:
        members = zf.infolist()
        problems = archive_problems(members)
        if problems:
            raise ValueError(f"{archive}: refusing unsafe archive:\n  " + "\n  ".join(problems))
        root = dest.resolve()
        files = 0
        for m in members:
            target = (dest / m.filename).resolve()
            if root not in target.parents and target != root:  # belt and braces after the checks above
                raise ValueError(f"{archive}: member {m.filename!r} would land outside {dest}")
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                _extract_member(zf, m, target, archive)
                files += 1
    return files
