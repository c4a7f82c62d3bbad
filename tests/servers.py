"""Real servers and long-running commands for the tests: start a command in its own process group,
wait until it answers over HTTP on 127.0.0.1 (servers), and stop the whole group (uvicorn workers,
flow-run subprocesses) afterwards."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(command: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                  cwd: str | Path | None = None, stop_timeout: float = 20) -> Iterator[subprocess.Popen]:
    """Run ``command`` (output to ``log_path``) until the block ends, then stop it and its children."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def http_server(command: list[str], ready_url: str, log_path: Path, *, env: dict[str, str] | None = None,
                timeout: float = 120, stop_timeout: float = 20) -> Iterator[subprocess.Popen]:
    """Run ``command`` until the block ends; ``ready_url`` must answer 200 within ``timeout`` s."""
    with process_group(command, log_path, env=env, stop_timeout=stop_timeout) as proc:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
