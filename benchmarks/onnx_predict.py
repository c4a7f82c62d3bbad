"""Prediction throughput: ``ssd predict`` (PyTorch) against ``ssd-onnx predict`` (onnxruntime) on the same images.

    python -m benchmarks.onnx_predict [--images 64] [--size 256] [--model models/model.pt] [--out F.json] [--smoke]

A folder of generated banana pictures (``benchmarks.bench.write_images``), one model (the file given
if it exists, else an untrained TinySSD: scores near 0.5 everywhere, a worst case for NMS) and its
ONNX export (``ssd.engine.onnx_export``). Measured, each over the whole folder at threshold 0.9:

* in process, the model already loaded: ``ssd.engine.prediction.predict_files`` (read, resize, the
  net and NMS in torch) against ``ssd_onnx.model.predict_files`` (the same reading, the ONNX graph on
  onnxruntime); the two alternate for ``--rounds`` rounds and the best of each counts, in wall
  seconds and in CPU seconds of all the process's threads (robust on a shared machine, where wall
  time mostly measures the wait for a core; onnxruntime's threads spin while they wait for work,
  which counts against it);
* as commands, from start to JSON (imports and model load included): ``ssd predict`` and
  ``ssd-onnx predict``, each a new process.

Both use the machine's cores as they come (torch's intra-op threads, onnxruntime's default); the
report names the CPU and torch's thread count. ``--smoke``: 4 images of 64x64, one round, untrained.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CONSUMER = ROOT / "consumer"
FULL = {"images": 64, "size": 256, "rounds": 3}
SMOKE = {"images": 4, "size": 64, "rounds": 1}
THRESHOLD = 0.9


def _model(folder: Path, model: Path | None, size: int) -> tuple[Path, Path, str]:
    """The weights file and its ONNX export in ``folder``, and what the weights are."""
    import contextlib

    from ssd.core.model import TinySSD, save_model
    from ssd.engine.inference import load_detector
    from ssd.engine.onnx_export import export_onnx

    weights = folder / "model.pt"
    if model is not None and model.is_file():
        weights.write_bytes(model.read_bytes())
        what = str(model)
    else:
        torch.manual_seed(0)
        save_model(TinySSD(1, classes=["banana"], image_size=size), weights,
                   params={"data": {"image_size": size, "classes": ["banana"]}})
        what = "untrained (scores near 0.5 everywhere: a worst case for NMS)"
    with contextlib.redirect_stdout(sys.stderr):
        export_onnx(load_detector(weights, size, device="cpu"), folder / "model.onnx", THRESHOLD)
    return weights, folder / "model.onnx", what


def _in_process(weights: Path, onnx_file: Path, paths: list[Path], size: int,
                rounds: int) -> dict[str, dict[str, float]]:
    """Best wall and CPU seconds (all threads of the process) over the folder for each side, model
    loaded beforehand, alternating."""
    from ssd.engine.inference import load_detector
    from ssd.engine.prediction import predict_files
    from ssd_onnx.model import load
    from ssd_onnx.model import predict_files as onnx_predict_files

    detector, onnx_model = load_detector(weights, size, device="cpu"), load(onnx_file)
    sides = {"torch": lambda: predict_files(paths, detector, THRESHOLD),
             "onnx": lambda: onnx_predict_files(onnx_model, paths, THRESHOLD)}
    best = {name: {"wall": float("inf"), "cpu": float("inf")} for name in sides}
    for name, run in sides.items():  # warm-up: first-call allocations and kernel choice
        run()
    for _ in range(rounds):
        for name, run in sides.items():
            start, cpu = time.perf_counter(), time.process_time()
            run()
            best[name] = {"wall": min(best[name]["wall"], time.perf_counter() - start),
                          "cpu": min(best[name]["cpu"], time.process_time() - cpu)}
    return best


def _command_seconds(folder: Path, weights: Path, onnx_file: Path, images: Path) -> dict[str, float]:
    """Wall seconds of each command, as a new process, over the images folder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(CONSUMER)])}
    commands = {"torch": [sys.executable, "-m", "ssd", "predict", str(images), "--model", str(weights),
                          "--threshold", str(THRESHOLD), "--device", "cpu"],
                "onnx": [sys.executable, "-m", "ssd_onnx", "predict", str(onnx_file), str(images),
                         "--threshold", str(THRESHOLD)]}
    out = {}
    for name, command in commands.items():
        start = time.perf_counter()
        subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True, timeout=600)
        out[name] = time.perf_counter() - start
    return out


def run(sizes: dict[str, int], model: Path | None = None, commands: bool = True) -> dict[str, Any]:
    """The report (module docstring); ``commands=False`` leaves out the two commands (their keys are None)."""
    from benchmarks.bench import cpu_info, write_images

    if str(CONSUMER) not in sys.path:
        sys.path.insert(0, str(CONSUMER))
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        paths = write_images(folder / "images", sizes["images"], sizes["size"])
        weights, onnx_file, what = _model(folder, model, sizes["size"])
        best = _in_process(weights, onnx_file, paths, sizes["size"], sizes["rounds"])
        seconds = (_command_seconds(folder, weights, onnx_file, folder / "images") if commands
                   else {"torch": None, "onnx": None})
    n = len(paths)
    return {"cpu": cpu_info(), "weights": what, "images": n, "image_size": sizes["size"], "threshold": THRESHOLD,
            "torch_images_per_sec": n / best["torch"]["wall"], "onnx_images_per_sec": n / best["onnx"]["wall"],
            "onnx_speedup": best["torch"]["wall"] / best["onnx"]["wall"],
            "torch_images_per_cpu_sec": n / best["torch"]["cpu"], "onnx_images_per_cpu_sec": n / best["onnx"]["cpu"],
            "onnx_cpu_speedup": best["torch"]["cpu"] / best["onnx"]["cpu"],
            "torch_command_s": seconds["torch"], "onnx_command_s": seconds["onnx"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_predict", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 images of 64x64, one round (seconds)")
    parser.add_argument("--images", type=int, default=None, help=f"images in the folder (default {FULL['images']})")
    parser.add_argument("--size", type=int, default=None, help=f"their side and the model's (default {FULL['size']})")
    parser.add_argument("--rounds", type=int, default=None, help=f"alternating rounds (default {FULL['rounds']})")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"),
                        help="weights, if the file exists (default: %(default)s; else untrained)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    sizes = dict(SMOKE if args.smoke else FULL)
    sizes.update({k: v for k, v in (("images", args.images), ("size", args.size), ("rounds", args.rounds)) if v})
    report = run(sizes, None if args.smoke else args.model)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        from ssd.util.files import atomic_write_json

        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
