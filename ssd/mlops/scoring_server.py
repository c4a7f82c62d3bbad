"""The HTTP side of ``ssd serve``: MLflow's scoring protocol for the TinySSD pyfunc, on the standard library.

Routes (JSON in and out)::

    POST /invocations  {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]},
                        "params": {"threshold": 0.5}}      (or "dataframe_records": [{"image": "<base64>"}, ...])
                       -> 200 {"predictions": [row, ...]}, rows as ssd.mlops.pyfunc.OUTPUT_COLUMNS
    GET  /ping         -> 200 when a model is loaded, else 503
    GET  /health       -> ssd.mlops.serving.Follower.status(); 200 when a model is loaded, else 503
    GET  /version      -> {"model_name", "model_version", "alias", "uri"} of the version answering now

Every ``/invocations`` answer names the version that answered: each row's ``model_version`` and the
headers :data:`VERSION_HEADER` and :data:`NAME_HEADER` (also on an answer with no detection).

Every input is bounded (:class:`Limits`): the body's bytes (``Content-Length`` required, checked before
the body is read), the images in one request, each image's pixels (the model's ``data.max_image_pixels``,
from its header, before it is decoded), the requests in flight (beyond them: 503 at once) and the
seconds a client may take to send. A refusal is ``{"error_code": ..., "message": one line}`` naming
the limit and the value: 400 a malformed request or image (naming the row), 408 a body that does not
arrive in time, 411 no length, 413 over a limit, 503 no model loaded yet or too many requests in flight.

Requests run on threads (``ThreadingHTTPServer``); each reads the version once and keeps it, so a swap
(:class:`~ssd.mlops.serving.Follower`) never fails one. Closing waits for the requests in flight.
"""
from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from ssd.data.images import ImageTooLarge
from ssd.mlops.pyfunc import IMAGE_COLUMN
from ssd.mlops.serving import Follower, one_line, score
from ssd.util.settings import SCHEMA

VERSION_HEADER, NAME_HEADER = "X-Model-Version", "X-Model-Name"
THRESHOLD = "threshold"   # the one request param (the pyfunc's signature)


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and how many are served at once."""
    max_body_bytes: int = 32 << 20   # base64 of ~24 MB of image files
    max_images: int = 64
    max_in_flight: int = 16          # requests read, decoded or detected at once
    read_timeout: float = 30.0       # seconds a client may take to send its request


class Refused(Exception):
    """A request answered with ``status`` and a one-line ``message``."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, max_images: int) -> tuple[list[Any], float | None]:
    """The column ``image`` of a scoring request and its ``threshold`` param (None: the model's)."""
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise Refused(HTTPStatus.BAD_REQUEST, f"the request body is not JSON ({one_line(exc)})") from None
    if not isinstance(request, dict):
        raise Refused(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
    rows = _rows(request)
    if len(rows) > max_images:
        raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                      f"{len(rows)} images in one request: the limit is --max-images = {max_images}")
    params = request.get("params") or {}
    if not isinstance(params, dict) or set(params) - {THRESHOLD}:
        raise Refused(HTTPStatus.BAD_REQUEST, f"params {params!r}: the only param is {THRESHOLD!r}"[:300])
    threshold = params.get(THRESHOLD)
    check = SCHEMA["evaluate.threshold"]
    if threshold is not None and (isinstance(threshold, bool) or not check.ok(threshold)):
        raise Refused(HTTPStatus.BAD_REQUEST, f"param {THRESHOLD}={threshold!r}: expected {check.expected}"[:300])
    return rows, threshold


def _rows(request: dict[str, Any]) -> list[Any]:
    """The ``image`` value of each row of ``dataframe_split`` or ``dataframe_records``."""
    if "dataframe_split" in request:
        split = request["dataframe_split"]
        columns = split.get("columns") if isinstance(split, dict) else None
        data = split.get("data") if isinstance(split, dict) else None
        if not isinstance(columns, list) or IMAGE_COLUMN not in columns or not isinstance(data, list):
            raise Refused(HTTPStatus.BAD_REQUEST, f"dataframe_split needs \"columns\" with {IMAGE_COLUMN!r} "
                                                  f"and \"data\": a list of rows")
        at = columns.index(IMAGE_COLUMN)
        for i, row in enumerate(data):
            if not isinstance(row, list) or len(row) != len(columns):
                raise Refused(HTTPStatus.BAD_REQUEST, f"row {i}: expected a list of {len(columns)} value(s)")
        return [row[at] for row in data]
    if "dataframe_records" in request:
        records = request["dataframe_records"]
        if not isinstance(records, list):
            raise Refused(HTTPStatus.BAD_REQUEST, "dataframe_records must be a list of objects")
        for i, record in enumerate(records):
            if not isinstance(record, dict) or IMAGE_COLUMN not in record:
                raise Refused(HTTPStatus.BAD_REQUEST, f"row {i}: expected an object with {IMAGE_COLUMN!r}")
        return [record[IMAGE_COLUMN] for record in records]
    raise Refused(HTTPStatus.BAD_REQUEST, f"expected \"dataframe_split\": {{\"columns\": [{IMAGE_COLUMN!r}], "
                                          f"\"data\": [[<base64>], ...]}} (or \"dataframe_records\")")


class ScoringServer(ThreadingHTTPServer):
    """The HTTP server of one :class:`Follower`; ``gate`` bounds the detections run at once."""
    daemon_threads = False   # server_close() waits for the requests in flight: a clean stop answers them
    block_on_close = True
    request_queue_size = 64  # connections the kernel holds while threads start (the stdlib's 5 drops bursts)

    def __init__(self, address: tuple[str, int], follower: Follower, limits: Limits,
                 log: Callable[[str], None] | None = None):
        super().__init__(address, _Handler)
        self.follower, self.limits = follower, limits
        self.in_flight = threading.BoundedSemaphore(limits.max_in_flight)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))


class _Handler(BaseHTTPRequestHandler):
    server: ScoringServer
    server_version = "ssd-serve"

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout  # a client that stops sending times out
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass  # no line per request; refusals are answered, failures logged (_fail)

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        served, route = self.server.follower.current, self.path.split("?")[0]
        up = HTTPStatus.OK if served is not None else HTTPStatus.SERVICE_UNAVAILABLE
        if route == "/ping":
            self._send(up, b"\n", "text/plain")
        elif route == "/health":
            self._json(up, self.server.follower.status())
        elif route == "/version":
            source = served.detector.source if served else None
            self._json(up, {"model_name": served.name if served else None,
                            "model_version": served.version if served else None,
                            "alias": source.alias if source else None, "uri": source.uri if source else None})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {route} (routes: /ping, /health, /version, "
                                              f"POST /invocations)")

    def do_POST(self) -> None:  # noqa: N802
        route = self.path.split("?")[0]
        if route != "/invocations":
            return self._error(HTTPStatus.NOT_FOUND, f"no route POST {route} (POST /invocations)")
        if not self.server.in_flight.acquire(blocking=False):
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {self.server.limits.max_in_flight} requests "
                                                               f"in flight (--max-in-flight); retry later")
        try:
            self._invocations()
        except Refused as exc:
            self._error(exc.status, str(exc))
        except Exception as exc:  # a bug or a broken model: answered and logged, the server goes on
            self._fail(exc)
        finally:
            self.server.in_flight.release()

    def _invocations(self) -> None:
        served = self.server.follower.current  # read once: this request ends on this version
        if served is None:
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "no model loaded yet (see GET /health)")
        values, threshold = parse_request(self._body(), self.server.limits.max_images)
        try:
            frame = score(served, values, served.threshold if threshold is None else threshold,
                          self.server.follower.gate)
        except ImageTooLarge as exc:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, one_line(exc)) from None
        except ValueError as exc:  # bad base64, not an image: the message names the row
            raise Refused(HTTPStatus.BAD_REQUEST, one_line(exc)) from None
        self._json(HTTPStatus.OK, {"predictions": frame.to_dict(orient="records")},
                   {NAME_HEADER: served.name, VERSION_HEADER: served.version})

    def _body(self) -> bytes:
        """The request body, refused before it is read when its declared length is over the limit."""
        limit = self.server.limits.max_body_bytes
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required") from None
        if length > limit:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"request body of {length} bytes: the limit is --max-body-bytes = {limit}")
        try:
            body = self.rfile.read(max(length, 0))
        except TimeoutError:
            raise Refused(HTTPStatus.REQUEST_TIMEOUT, f"the request body did not arrive within "
                                                      f"{self.server.limits.read_timeout:g} s") from None
        if len(body) < length:
            raise Refused(HTTPStatus.BAD_REQUEST, f"request body ended after {len(body)} of {length} bytes")
        return body

    def _fail(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {one_line(exc)}"
        self.server.log(f"ssd serve: POST /invocations failed: {message}")
        self._error(HTTPStatus.INTERNAL_SERVER_ERROR, message)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self.close_connection = True  # an unread body must not be read as the next request
        self._json(status, {"error_code": status.name, "message": message})

    def _json(self, status: HTTPStatus, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: HTTPStatus, data: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def serve(follower: Follower, host: str, port: int, limits: Limits,
          log: Callable[[str], None] | None = None) -> None:
    """Load the first version, then answer requests until interrupted (``ssd.util.errors.Interrupted``
    from the signal handler ``ssd.cli`` installs, or ``KeyboardInterrupt``); then stop polling, answer
    the requests in flight, close."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    server = ScoringServer((host, port), follower, limits, log)  # bound first: a port in use fails at once
    try:
        follower.start()
        where = f"http://{host}:{server.server_address[1]}"
        log(f"ssd serve: listening on {where}, following {follower.uri}"
            + (f" (polled every {follower.poll_seconds:g} s)" if follower.alias else ""))
        server.serve_forever()
    finally:  # then ssd.cli reports the signal that stopped it
        follower.stop()
        server.server_close()
