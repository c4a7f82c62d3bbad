"""`ssd serve` follows the champion: a real `ssd serve` process, started outside any checkout, answers a
stream of concurrent requests while `ssd promote` (a real process) moves the alias, and none fails; a
version that does not load and a registry that stops answering leave the current version serving and
show in /health; oversized and malformed requests are refused with a one-line 4xx; SIGTERM stops it
with exit 143. The registry is a real `mlflow server`, reached by `ssd serve` through a real proxy
that the test closes to make it unreachable."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from PIL import Image

from servers import FaultyProxy, free_port, wait_ready
from ssd.core.model import TinySSD, save_model
from ssd.mlops.scoring_server import VERSION_HEADER
from ssd.mlops.records import CHAMPION
from ssd.mlops.registry import log_pyfunc, model_config
from ssd.mlops.tracking import client as mlflow_client
from ssd.util.params import load_settings

ROOT = Path(__file__).resolve().parents[2]
NAME = "tinyssd-follow"
POLL = 1  # seconds
MAX_BODY, MAX_IMAGES, MAX_PIXELS = 300_000, 4, 40_000

pytestmark = pytest.mark.slow


def png(width: int = 64, height: int = 64, color=(200, 180, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def body(*images: bytes | str, threshold: float = 0.0) -> bytes:
    rows = [[image if isinstance(image, str) else base64.b64encode(image).decode()] for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows},
                       "params": {"threshold": threshold}}).encode()


class Answer(NamedTuple):
    status: int
    header: str | None
    payload: dict


def post(base: str, data: bytes) -> Answer:
    request = urllib.request.Request(base + "/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return Answer(r.status, r.headers.get(VERSION_HEADER), json.loads(r.read()))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers.get(VERSION_HEADER), json.loads(exc.read()))


def get(base: str, route: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + route, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(condition, timeout: float, what: str) -> float:
    """Seconds until ``condition()`` holds; fails naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def versions(mlflow_server, tmp_path_factory):
    """Two 64-px versions of NAME, each the pyfunc `ssd register` logs (its settings in the model
    config); the first is champion."""
    import mlflow

    tmp = tmp_path_factory.mktemp("follow")
    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64"], ("data", "evaluate"))
    client = mlflow_client(mlflow_server)
    numbers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(TinySSD(1), tmp / f"model{seed}.pt")
        with mlflow.start_run() as run:
            pass
        model_uri = log_pyfunc(run.info.run_id, tmp / f"model{seed}.pt", model_config(settings.data, settings.evaluate))
        numbers.append(mlflow.register_model(model_uri, NAME).version)
    client.set_registered_model_alias(NAME, CHAMPION, numbers[0])
    return numbers


class Server(NamedTuple):
    base: str
    proc: subprocess.Popen
    proxy: FaultyProxy
    log: Path


@pytest.fixture(scope="module")
def server(versions, mlflow_server, tmp_path_factory):
    """`ssd serve` of NAME's champion, run from a folder outside any checkout, reaching the registry
    through a proxy (closing it makes the registry unreachable for the server alone)."""
    folder = tmp_path_factory.mktemp("consumer")
    proxy = FaultyProxy(mlflow_server)
    port = free_port()
    command = [sys.executable, "-m", "ssd", "serve", "--model", f"models:/{NAME}@champion", "--port", str(port),
               "--poll-seconds", str(POLL), "--max-body-bytes", str(MAX_BODY), "--max-images", str(MAX_IMAGES),
               "-S", f"data.max_image_pixels={MAX_PIXELS}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": proxy.uri}
    log = folder / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(proc, lambda: _up(base), 120, log)
        yield Server(base, proc, proxy, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proxy.__exit__(None, None, None)  # idempotent: the test may have closed it


def _up(base: str) -> bool:
    try:
        return get(base, "/health")[0] == 200
    except OSError:
        return False


def test_oversized_and_malformed_requests_are_refused_in_one_line(server):
    cases = [
        (body(png(), "bm90IGFuIGltYWdl", "!!not base64"), 400, "row 2: column 'image' is not valid base64"),
        (body(png(), b"not an image"), 400, "image #1: cannot be read as an image"),
        (body(*[png()] * (MAX_IMAGES + 1)), 413, f"5 images in one request: the limit is --max-images = {MAX_IMAGES}"),
        (body(png(300, 300)), 413, f"image #0: image too large (300x300 pixels; the limit is data.max_image_pixels "
                                   f"= {MAX_PIXELS})"),
        (b"{" + b" " * MAX_BODY + b"}", 413, f"request body of {MAX_BODY + 2} bytes: the limit is --max-body-bytes = "
                                            f"{MAX_BODY}"),
        (b"[1, 2", 400, "the request body is not JSON"),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": []}, "params": {"threshold": 2}}).encode(),
         400, "param threshold=2: expected a number >= 0 and <= 1"),
    ]
    for data, status, message in cases:
        answer = post(server.base, data)
        assert answer.status == status, (message, answer)
        assert answer.payload["message"].startswith(message) and "\n" not in answer.payload["message"], answer
    ok = post(server.base, body(png(90, 40)))  # the server goes on
    assert ok.status == 200 and ok.payload["predictions"]
    assert all(p["xmax"] <= 90 and p["ymax"] <= 40 for p in ok.payload["predictions"])


class Result(NamedTuple):
    start: float
    end: float
    status: int | str
    header: str | None
    rows: frozenset


def stream(base: str, stop: threading.Event, results: list) -> None:
    """Requests one after another until ``stop``; every outcome recorded (an exception as its repr)."""
    data = body(png(80, 60))
    while not stop.is_set():
        start = time.monotonic()
        try:
            answer = post(base, data)
            status, header = answer.status, answer.header
            rows = frozenset(p["model_version"] for p in answer.payload.get("predictions", []))
        except Exception as exc:
            status, header, rows = repr(exc), None, frozenset()
        results.append(Result(start, time.monotonic(), status, header, rows))


def test_follows_the_champion_without_failing_a_request(server, versions, mlflow_server, tmp_path):
    v1, v2 = map(str, versions)
    status, health = get(server.base, "/health")
    assert status == 200 and health["model"]["version"] == v1 and health["model"]["alias"] == "champion"
    assert health["last_poll_error"] is None and get(server.base, "/version")[1]["model_version"] == v1

    # A promotion, under a stream of requests from three clients.
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=stream, args=(server.base, stop, results)) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        time.sleep(1)
        before = time.monotonic()
        promote = subprocess.run([sys.executable, "-m", "ssd", "promote", "--name", NAME, "--version", v2],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_server})
        assert promote.returncode == 0, promote.stderr
        # From the moment `ssd promote` returned (the alias moved before): one poll, one load, a margin.
        waited = wait_for(lambda: any(r.header == v2 for r in results), POLL + 15, f"a response from version {v2}")
        time.sleep(1)
    finally:
        stop.set()
        for client in clients:
            client.join()
    failed = [r for r in results if r.status != 200]
    assert not failed and len(results) > 10, failed[:3]
    assert all(r.rows == {r.header} for r in results)  # each row names the version the header names
    first_v2 = min(r.end for r in results if r.header == v2)
    assert {r.header for r in results if r.end < before} == {v1}
    assert {r.header for r in results if r.start > first_v2} == {v2}  # after the swap, only the new one
    print(f"promotion served {waited:.1f} s after `ssd promote` returned; {len(results)} requests, none failed")
    status, health = get(server.base, "/health")
    assert status == 200 and health["model"]["version"] == v2 and health["alias_version"] == int(v2)

    # A version that is not a TinySSD becomes champion: version 2 keeps answering, /health says why.
    v3 = register_junk(mlflow_server, tmp_path)
    wait_for(lambda: f"names version {v3}, not served" in (get(server.base, "/health")[1]["last_poll_error"] or ""),
             POLL + 15, "/health reporting the refused version")
    def asked(route: str) -> int:  # requests the server made to the registry on this route
        return sum(route in path for _, path, _ in list(server.proxy.log))

    versions_read, polls = asked("/model-versions/get"), asked("/registered-models/alias")
    time.sleep(2 * POLL + 1)  # more polls: the error is logged once, the version not fetched again
    assert asked("/registered-models/alias") > polls and asked("/model-versions/get") == versions_read
    answer = post(server.base, body(png()))
    assert answer.status == 200 and answer.header == v2
    health = get(server.base, "/health")[1]
    assert health["model"]["version"] == v2 and health["alias_version"] == int(v3)
    assert server.log.read_text().count(f"names version {v3}, not served") == 1

    # The registry stops answering: the server goes on with version 2, /health says so.
    server.proxy.server.shutdown()
    server.proxy.server.server_close()
    wait_for(lambda: "unreachable" in (get(server.base, "/health")[1]["last_poll_error"] or ""), POLL + 15,
             "/health reporting the unreachable registry")
    time.sleep(2 * POLL)
    answer = post(server.base, body(png()))
    assert answer.status == 200 and answer.header == v2
    status, health = get(server.base, "/health")
    assert status == 200 and health["model"]["version"] == v2
    assert server.log.read_text().count("is unreachable") == 1

    # SIGTERM: a clean stop, exit 143.
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 143
    assert server.log.read_text().splitlines()[-1] == "ssd serve: stopped by SIGTERM"


def register_junk(server: str, tmp_path: Path) -> str:
    """A version of NAME whose weights are not a TinySSD, made champion as a person would in the UI."""
    import mlflow

    from ssd.mlops import pyfunc

    junk = tmp_path / "junk.pt"
    torch.save({"config": {"num_classes": 1}, "model": {"layer.weight": torch.zeros(3)}}, junk)
    mlflow.set_tracking_uri(server)
    mlflow.set_registry_uri(server)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=pyfunc.__file__, artifacts={"weights": str(junk)},
                                       model_config={"image_size": 64, "nms_threshold": 0.5, "threshold": 0.9},
                                       pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, NAME).version
    mlflow.MlflowClient(server).set_registered_model_alias(NAME, CHAMPION, version)
    return str(version)
