"""``ssd serve``: answer detection requests over HTTP with the registry's champion, following the alias.

    ssd serve [--model models:/tinyssd@champion] [--host 127.0.0.1] [--port 5001] [--poll-seconds 10]
              [--workers 1] [--max-body-bytes N] [--max-images N] [--max-in-flight N] [--device cpu]

MLflow's scoring protocol (``POST /invocations``) and ``GET /ping``, ``/health``, ``/version``:
``ssd.mlops.scoring_server``. The registry is ``MLFLOW_TRACKING_URI``'s, as for every command. Each
version is loaded as ``ssd predict`` loads a model (``ssd.stages.model_params``): weights and settings,
never code stored in the registry, detecting with its own settings; ``-S evaluate.threshold`` and
``-S data.max_image_pixels`` override its defaults. With ``--model models:/<name>@<alias>`` the alias
is followed: a promotion is served within ``--poll-seconds`` plus the load time, and a version that
fails to load keeps the current one serving (``ssd.mlops.serving``). Runs until SIGTERM or SIGINT,
then answers the requests in flight and exits 143 or 130 (``ssd.util.errors``).
"""
from __future__ import annotations

import argparse
import threading
from typing import Callable

from ssd.mlops.models import URI_FORMS
from ssd.mlops.records import CHAMPION, alias_uri
from ssd.mlops.scoring_server import Limits, serve
from ssd.mlops.serving import Follower, Served
from ssd.stages import common, model_params

PARAMS = ("evaluate.threshold", "evaluate.nms_threshold", "evaluate.nms", "data.image_size",
          "data.max_image_pixels", "registry.model_name")
DEFAULT_PORT = 5001  # beside MLflow's 5000


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    limits = Limits()
    parser.add_argument("--model", default=None,
                        help=f"{URI_FORMS} (default: models:/<registry.model_name>@{CHAMPION}; an alias is followed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0: any free)")
    parser.add_argument("--poll-seconds", type=_positive(float), default=10.0,
                        help="how often the registry is asked where the alias points (default: %(default)s)")
    parser.add_argument("--workers", type=_positive(int), default=1,
                        help="detections run at once, each on cores/N torch threads (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=_positive(int), default=limits.max_body_bytes,
                        help="largest request body (default: %(default)s)")
    parser.add_argument("--max-images", type=_positive(int), default=limits.max_images,
                        help="most images in one request (default: %(default)s)")
    parser.add_argument("--max-in-flight", type=_positive(int), default=limits.max_in_flight,
                        help="requests handled at once; more are answered 503 (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    given = model_params.given_params(args, PARAMS)  # a bad param is refused before anything starts
    uri = args.model or alias_uri(model_params.value(given, "registry.model_name"), CHAMPION)
    # Concurrent detections share the cores rather than each taking all of them.
    torch.set_num_threads(max(1, torch.get_num_threads() // args.workers))

    def load(model: str) -> Served:
        detector, settings = model_params.open_detector(args, PARAMS, "serve", args.device, model=model)
        return Served(detector, settings.evaluate.threshold, settings.data.max_image_pixels, loaded_at=0.0)

    limits = Limits(args.max_body_bytes, args.max_images, args.max_in_flight)
    follower = Follower(uri, load, args.poll_seconds, threading.BoundedSemaphore(args.workers))
    serve(follower, args.host, args.port, limits)
    return 0
