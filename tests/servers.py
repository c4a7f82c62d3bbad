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


def dead_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    return free_port()


class FaultyProxy:
    """A real HTTP proxy on 127.0.0.1 in front of ``target`` (``http://host:port``) that answers
    HTTP 500 (MLflow's JSON error body) to every request whose path contains a string in ``fail``;
    everything else is forwarded as it is. ``log`` lists ``(method, path, status)`` of each request."""

    def __init__(self, target: str, fail: tuple[str, ...] = ()):
        import http.client
        import http.server
        import threading
        import urllib.parse

        self.fail, self.log = set(fail), []
        parsed = urllib.parse.urlsplit(target)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if any(part in self.path for part in outer.fail):
                    status, headers = 500, {"Content-Type": "application/json"}
                    data = b'{"error_code": "INTERNAL_ERROR", "message": "injected by the test proxy"}'
                else:
                    upstream = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
                    forwarded = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream.request(self.command, self.path, body=body or None, headers=forwarded)
                    answer = upstream.getresponse()
                    status, data = answer.status, answer.read()
                    headers = {k: v for k, v in answer.getheaders()
                               if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                    upstream.close()
                outer.log.append((self.command, self.path, status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def failed(self) -> list[tuple[str, str, int]]:
        return [entry for entry in self.log if entry[2] == 500]

    def __enter__(self) -> "FaultyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
