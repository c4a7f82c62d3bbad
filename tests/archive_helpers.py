"""Building test archives and serving them: shared by the data tests."""
from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ssd.data.layout import DATASET_DIR, IMAGES_DIR, LABEL_FILE, LABEL_HEADER, SPLIT_DIRS
from ssd.data.synthetic import generate_archive

TINY = {"seed": 0, "train": 8, "val": 4, "max_objects": 1, "classes": ["banana"]}


def good_zip(path: Path, **overrides) -> Path:
    """A small archive in the real layout (8 train + 4 val generated images)."""
    generate_archive(path, **{**TINY, **overrides})
    return path


def zip_with(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> Path:
    """A zip of ``(name, data)`` members (names written verbatim) plus symlink members ``name -> target``."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK | rwxrwxrwx, as `zip --symlinks` writes it
            zf.writestr(info, target)
    return path


def layout_members(prefix: str = DATASET_DIR) -> list[tuple[str, bytes]]:
    """The members of a valid-looking layout (content does not matter for extraction tests)."""
    return [(f"{prefix}/{s}/{LABEL_FILE}", f"{LABEL_HEADER}\n".encode()) for s in SPLIT_DIRS.values()] + \
        [(f"{prefix}/{s}/{IMAGES_DIR}/0.png", b"x") for s in SPLIT_DIRS.values()]


def sha1_of(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def tree_hash(root: Path) -> str:
    """One hash over every file's relative path and bytes under ``root`` ("" when it does not exist)."""
    root = Path(root)
    if not root.exists():
        return ""
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(directory: Path, handler: type = _QuietHandler) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 in a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/banana-detection.zip"
