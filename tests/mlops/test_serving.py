"""The pieces of `ssd serve` without a server: a scoring request's bounds, the follower with a model file
and with a registry that does not answer (the end-to-end service: tests/pipeline/test_serve_champion.py)."""
import base64
import io
import json
import socket
import threading
import time
from contextlib import nullcontext
from http import HTTPStatus

import pytest
from PIL import Image

from servers import dead_port
from ssd.mlops.models import load_detector
from ssd.mlops.pyfunc import OUTPUT_COLUMNS
from ssd.mlops.scoring_server import Refused, parse_request
from ssd.mlops.serving import Follower, Served, score


def request(rows, **params) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}, "params": params}).encode()


@pytest.mark.parametrize("body, status, message", [
    (request([["a"]] * 5), HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
     "5 images in one request: the limit is --max-images = 4"),
    (request([["a"]], threshold=1.5), HTTPStatus.BAD_REQUEST, "param threshold=1.5: expected a number >= 0 and <= 1"),
    (request([["a"]], threshold=True), HTTPStatus.BAD_REQUEST, "param threshold=True: expected a number"),
    (request([["a"]], nms=0.3), HTTPStatus.BAD_REQUEST, "params {'nms': 0.3}: the only param is 'threshold'"),
    (request([["a", "b"]]), HTTPStatus.BAD_REQUEST, "row 0: expected a list of 1 value(s)"),
    (json.dumps({"dataframe_split": {"columns": ["img"], "data": []}}).encode(), HTTPStatus.BAD_REQUEST,
     "dataframe_split needs \"columns\" with 'image'"),
    (json.dumps({"inputs": [1]}).encode(), HTTPStatus.BAD_REQUEST, "expected \"dataframe_split\""),
    (json.dumps({"dataframe_records": [{"image": "a"}, {"x": 1}]}).encode(), HTTPStatus.BAD_REQUEST,
     "row 1: expected an object with 'image'"),
    (b"\xff\xfe", HTTPStatus.BAD_REQUEST, "the request body is not JSON"),
    (b"[1]", HTTPStatus.BAD_REQUEST, "the request body must be a JSON object"),
])
def test_a_request_out_of_bounds_is_refused_in_one_line(body, status, message):
    with pytest.raises(Refused) as refused:
        parse_request(body, max_images=4)
    assert refused.value.status == status and str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_both_of_mlflows_dataframe_forms_are_read():
    assert parse_request(request([["a"], ["b"]], threshold=0.25), 4) == (["a", "b"], 0.25)
    records = json.dumps({"dataframe_records": [{"image": "a"}, {"image": "b"}]}).encode()
    assert parse_request(records, 4) == (["a", "b"], None)


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 180, 20)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_model_file_is_loaded_once_checked_and_scored_as_the_pyfunc_answers(model_file):
    loads, lines = [], []

    def load(uri: str) -> Served:
        loads.append(uri)
        return Served(load_detector(uri, image_size=64, device="cpu"), 0.9, 10**6, 0.0)

    follower = Follower(str(model_file), load, poll_seconds=0.05, gate=nullcontext(), log=lines.append)
    follower.start()
    try:
        served = follower.current
        assert served is not None and served.loaded_at > 0 and loads == [str(model_file)]
        time.sleep(0.3)  # several poll periods: a fixed model is not loaded again
        assert loads == [str(model_file)] and follower.current is served
        status = follower.status()
        assert status["status"] == "ok" and status["last_poll_error"] is None
        assert status["model"]["uri"] == str(model_file) and status["model"]["version"] == ""
        frame = score(served, [_png(90, 40)], 0.0, follower.gate)
        assert list(frame.columns) == OUTPUT_COLUMNS and len(frame) > 0 and (frame["xmax"] <= 90).all()
        assert set(frame["model_version"]) == {""}
        with pytest.raises(ValueError, match="row 1: column 'image' is not valid base64"):
            score(served, [_png(10, 10), "!!"], 0.0, follower.gate)
    finally:
        follower.stop()
    assert lines == [f"ssd serve: serving {model_file} (version -), loaded and checked in "
                     f"{lines[0].rsplit(' in ', 1)[1]}"]


def test_an_unreachable_registry_is_kept_for_health_and_logged_once(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{dead_port()}")
    lines = []
    follower = Follower("models:/tinyssd@champion", lambda uri: pytest.fail("nothing to load"), poll_seconds=1,
                        gate=nullcontext(), log=lines.append)
    for _ in range(3):
        follower.poll()  # never raises
    status = follower.status()
    assert status["status"] == "unavailable" and status["model"] is None and status["last_poll"]
    assert "is unreachable" in status["last_poll_error"]
    assert len(lines) == 1 and lines[0].startswith("ssd serve: poll failed (no model loaded): MLflow tracking server")


def test_a_registry_unreachable_in_several_ways_is_logged_once(monkeypatch):
    """A registry going down answers each poll differently (connections closed unanswered while it
    stops, then refused): one problem, one log line; /health keeps the latest message."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    closing = threading.Thread(target=lambda: [listener.accept()[0].close() for _ in range(2)], daemon=True)
    closing.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    lines = []
    follower = Follower("models:/tinyssd@champion", lambda uri: pytest.fail("nothing to load"), poll_seconds=1,
                        gate=nullcontext(), log=lines.append)
    follower.poll()
    closed = follower.error
    follower.poll()
    closing.join(5)
    listener.close()
    follower.poll()
    refused = follower.error
    assert "is unreachable" in closed and "is unreachable" in refused and closed != refused
    assert len(lines) == 1 and closed in lines[0]
