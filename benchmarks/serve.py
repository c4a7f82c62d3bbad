"""Serving: latency and throughput of ``ssd serve`` for single-image and batched requests.

    python -m benchmarks.serve [--smoke] [--image-size 256] [--clients 4] [--workers 1 2]
                               [--model models/model.pt] [--out reports/serve_bench.json]

Registers ``--model`` (default: an untrained TinySSD, seed 0) as the champion of a model in a local
MLflow store (SQLite, in a temporary folder), starts ``ssd serve`` on it as a real process
(``python -m ssd serve``, one per ``--workers`` value), and sends generated banana pictures (256x256
PNG; the model's size is ``--image-size``) over HTTP from client threads in this process. For each case:

* ``single``: one image per request from 1 client, then from ``--clients`` clients at once;
* ``batch8``, ``batch32``: 8 and 32 images per request from ``--clients`` clients;

it reports the latency of a request (p50, p99, ms) and images/s over the case's wall time, after
one warm-up request per client, and the server's CPU time per image (all its threads, warm-up
included: the figure a busy shared machine does not blur). Also: the seconds from starting the
server to its first 200 on ``/health`` (imports, model download, check), the server's resident
memory then (``VmRSS``) and its peak over the run (``VmHWM``).
The clients run on the same cores as the server: on a small machine they take part of its CPU.
``--smoke`` runs a few requests on a 64-pixel model, in seconds.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("reports/serve_bench.json")
NAME = "tinyssd-bench"
PICTURE_SIZE = 256  # what clients send, whatever the model's size: the server resizes, as for a photo
FULL = {"image_size": 256, "requests": {"single": 120, "single_concurrent": 200, "batch8": 40, "batch32": 12}}
SMOKE = {"image_size": 64, "requests": {"single": 4, "single_concurrent": 4, "batch8": 2, "batch32": 2}}
CASES = (("single", 1, False), ("single_concurrent", 1, True), ("batch8", 8, True), ("batch32", 32, True))


def register_champion(root: Path, image_size: int, model: Path | None = None) -> str:
    """``model`` (default: an untrained TinySSD, seed 0) registered as ``NAME``'s champion in a SQLite
    store under ``root``, with params.yaml's settings at ``image_size``; the store's URI."""
    import shutil

    import mlflow
    import torch

    from ssd.core.model import TinySSD, save_model
    from ssd.mlops.records import CHAMPION
    from ssd.mlops.registry import log_pyfunc, model_config
    from ssd.mlops.tracking import client
    from ssd.util.params import load_settings

    uri = f"sqlite:///{root / 'mlflow.db'}"
    found = client(uri)
    if model is not None:
        shutil.copy(model, root / "model.pt")
    else:
        torch.manual_seed(0)
        save_model(TinySSD(1, image_size=image_size), root / "model.pt")
    settings = load_settings(ROOT / "params.yaml", [f"data.image_size={image_size}"], ("data", "evaluate"))
    with mlflow.start_run() as run:
        pass
    model_uri = log_pyfunc(run.info.run_id, root / "model.pt", model_config(settings.data, settings.evaluate))
    version = mlflow.register_model(model_uri, NAME).version
    found.set_registered_model_alias(NAME, CHAMPION, version)
    return uri


def request_bodies(count: int, per_request: int) -> list[bytes]:
    """``count`` request bodies of ``per_request`` generated pictures each (MLflow's dataframe_split)."""
    import numpy as np
    from PIL import Image

    from ssd.data.synthetic import render_image

    pictures = []
    for i in range(min(count * per_request, 64)):  # distinct pictures, reused beyond 64
        buffer = io.BytesIO()
        Image.fromarray(render_image(np.random.default_rng(i), PICTURE_SIZE).image).save(buffer, format="PNG")
        pictures.append(base64.b64encode(buffer.getvalue()).decode())
    return [json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [pictures[(r * per_request + k) % len(pictures)]] for k in range(per_request)]}}).encode()
        for r in range(count)]


def post(url: str, body: bytes) -> float:
    """Seconds for one ``/invocations`` request; raises unless it answers 200."""
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
    return time.perf_counter() - start


def run_case(url: str, bodies: list[bytes], clients: int, per_request: int) -> dict[str, Any]:
    """``bodies`` sent by ``clients`` threads (each warms up with one request first): latency and images/s."""
    for body in bodies[:clients]:
        post(url, body)
    latencies: list[float] = []
    queue, lock, errors = list(bodies), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            try:
                seconds = post(url, body)
            except Exception as exc:  # counted, not fatal: the report says how many failed
                errors.append(repr(exc))
                continue
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] if ordered else float("nan")
    return {"clients": clients, "images_per_request": per_request, "requests": len(latencies),
            "failed": len(errors), "p50_ms": 1e3 * statistics.median(ordered) if ordered else float("nan"),
            "p99_ms": 1e3 * p99, "images_per_s": len(latencies) * per_request / wall, "wall_s": wall}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, key: str = "VmHWM") -> float:
    """A process's peak (``VmHWM``) or current (``VmRSS``) resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_server(tracking: str, root: Path, workers: int, sizes: dict[str, Any], clients: int,
                 log: Any = print) -> dict[str, Any]:
    """One ``ssd serve --workers N`` process, every case of :data:`CASES` against it."""
    from ssd.mlops.records import alias_uri

    port = free_port()
    command = [sys.executable, "-m", "ssd", "serve", "--model", alias_uri(NAME), "--port", str(port),
               "--workers", str(workers), "--device", "cpu"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(ROOT)}
    base = f"http://127.0.0.1:{port}"
    with open(root / f"serve-{workers}.log", "wb") as server_log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            ready_s = _wait_ready(proc, base + "/health", root / f"serve-{workers}.log") - start
            report: dict[str, Any] = {"workers": workers, "ready_s": ready_s,
                                      "ready_rss_mib": memory_mib(proc.pid, "VmRSS"), "cases": {}}
            for case, per_request, concurrent in CASES:
                log(f"workers {workers}: {case} ...")
                bodies = request_bodies(sizes["requests"][case], per_request)
                used = cpu_seconds(proc.pid)
                result = run_case(base + "/invocations", bodies, clients if concurrent else 1, per_request)
                # Warm-up requests included: CPU per image is what a shared machine cannot blur.
                images = (result["requests"] + result["clients"]) * per_request
                result["server_cpu_ms_per_image"] = 1e3 * (cpu_seconds(proc.pid) - used) / images
                report["cases"][case] = result
            report["peak_rss_mib"] = memory_mib(proc.pid)
        finally:
            proc.terminate()
            code = proc.wait(timeout=60)
    report["exit_code_on_sigterm"] = code
    return report


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ssd serve exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"ssd serve not ready after {timeout} s: {log_path.read_text()[-2000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['cpu']} ({report['cores']} cores), model {report['model']} at {report['image_size']} px, "
             f"{PICTURE_SIZE}x{PICTURE_SIZE} PNG, {report['clients']} concurrent clients in the benchmark process",
             "workers  case                clients  img/req  requests  p50 ms  p99 ms  images/s  CPU ms/img"]
    for server in report["servers"]:
        for case, r in server["cases"].items():
            lines.append(f"{server['workers']:>7}  {case:<18}  {r['clients']:>7}  {r['images_per_request']:>7}  "
                         f"{r['requests']:>8}  {r['p50_ms']:>6.1f}  {r['p99_ms']:>6.1f}  {r['images_per_s']:>8.1f}  "
                         f"{r['server_cpu_ms_per_image']:>10.1f}")
        lines.append(f"{server['workers']:>7}  ready in {server['ready_s']:.1f} s with {server['ready_rss_mib']:.0f} "
                     f"MiB resident, peak {server['peak_rss_mib']:.0f} MiB; exit {server['exit_code_on_sigterm']} "
                     f"on SIGTERM")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few requests on a 64-pixel model (seconds)")
    parser.add_argument("--image-size", type=int, default=None, help="the model's image size (default: 256; smoke 64)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="ssd serve --workers values to measure (default: 1 2)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model file trained at --image-size to serve (default: an untrained TinySSD, whose "
                             "scores near 0.5 everywhere are a worst case for NMS)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    from ssd.util.files import atomic_write_json

    from .bench import cpu_info

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    sizes = json.loads(json.dumps(SMOKE if args.smoke else FULL))
    sizes["image_size"] = args.image_size or sizes["image_size"]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="ssd-serve-bench-") as tmp:
        root = Path(tmp)
        log("registering an untrained model ...")
        tracking = register_champion(root, sizes["image_size"], args.model)
        servers = [bench_server(tracking, root, w, sizes, args.clients, log) for w in args.workers]
    report = {"smoke": args.smoke, "image_size": sizes["image_size"], "clients": args.clients,
              "model": str(args.model) if args.model else "untrained (seed 0)",
              "cpu": cpu_info()["name"], "cores": os.cpu_count(), "servers": servers}
    print(format_table(report))
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
