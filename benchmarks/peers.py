"""The project's recipes side by side with a from-scratch peer, on one dataset folder, scored the same way.

    python -m benchmarks.peers DATA --classes person [--image-sizes 128 256] [--epochs 40] [--seeds 0 1 2]
        [--systems book photos yolov8n] [--work DIR] [--jobs 1] [--threads 1] [--out table.md]

``DATA`` is a dataset folder in the banana layout (``train/`` and ``val/``, each with ``images/`` and
``label.csv``), read with ``data.strict: false`` (photos of any size). Each system trains on ``train/``
from scratch with the same image size, epochs and seed, and is scored on ``val/`` with the project's
metrics (``ssd.engine.metrics``: torchmetrics' ``MeanAveragePrecision``, pycocotools), every system's
detections in the same frame: the validation image resized to ``image_size`` square. Systems:

- ``book``, ``photos``: ``train.recipe`` of the project (``params.yaml`` otherwise), trained with the
  ``ssd train`` loop (``ssd.engine``) and scored with its model's own evaluation settings;
- ``yolov8n``: Ultralytics YOLOv8n from its yaml (``benchmarks.peer_yolo``; needs ultralytics, else it is
  skipped with a note).

Every run is a child process (``--threads`` torch threads each, at most ``--jobs`` at once) that writes
``<system>-<size>-s<seed>.json`` (metrics, wall time, settings) and its detections (``.pt``) under
``--work``; a result already there with the same settings is reused, so an interrupted benchmark resumes.
The table (mean and each seed's mAP@0.5 and mAP@[.5:.95], per-class AP, wall time) goes to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

PROJECT = Path(__file__).resolve().parent.parent
RECIPES = ("book", "photos")
PEERS = ("yolov8n",)


def ground_truth(root: Path, classes: Sequence[str], image_size: int) -> tuple[list[str], list[torch.Tensor]]:
    """The validation images' names and boxes ``Tensor[M, 5]`` in the ``image_size``-square pixel frame."""
    from ssd.data.dataset import load_dataset

    val = load_dataset(root, "val", image_size, classes)
    targets = [t[t[:, 0] >= 0] * torch.tensor([1.0, *[image_size] * 4]) for t in val.labels]
    return list(val.names), targets


def score(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], classes: Sequence[str]) -> dict[str, Any]:
    """mAP@0.5, mAP@[.5:.95] and per-class AP of detections ``Tensor[K, 6]`` against ``targets``."""
    from ssd.engine.metrics import MAX_DETECTIONS, coco_map, per_class_ap

    preds = [p[torch.argsort(p[:, 1], descending=True, stable=True)][:MAX_DETECTIONS] for p in preds]
    return {**coco_map(preds, targets), "per_class": per_class_ap(preds, targets, classes)}


def project_overrides(root: Path, classes: Sequence[str], image_size: int, epochs: int, seed: int,
                      recipe: str) -> list[str]:
    """``params.yaml`` overrides of one project run (``-S`` items)."""
    names = ", ".join(json.dumps(c) for c in classes)
    return [f"base.seed={seed}", f"data.classes=[{names}]", f"data.image_size={image_size}", "data.strict=false",
            f"train.epochs={epochs}", f"train.recipe={recipe}"]


def train_project(root: Path, classes: Sequence[str], image_size: int, epochs: int, seed: int,
                  recipe: str) -> tuple[list[torch.Tensor], float, dict[str, Any]]:
    """Train TinySSD with ``train.recipe=recipe`` as ``ssd train`` does; its validation detections in
    the square pixel frame, the training's wall time and the evaluation settings its model carries."""
    from ssd.core.model import read_model
    from ssd.data.dataset import load_dataset
    from ssd.engine import distributed as dist
    from ssd.engine.evaluation import run_model
    from ssd.engine.loop import Progress, TrainPaths, finish, fit
    from ssd.engine.setup import build
    from ssd.mlops.models import file_settings
    from ssd.stages.train import PARAMS
    from ssd.util.params import load_settings

    overrides = project_overrides(root, classes, image_size, epochs, seed, recipe)
    settings = load_settings(PROJECT / "params.yaml", overrides, PARAMS)
    evaluate = load_settings(PROJECT / "params.yaml", overrides, ["evaluate"]).evaluate
    info = dist.DistInfo(0, 0, 1, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="peer-ssd-") as tmp:
        out = Path(tmp)
        paths = TrainPaths(root, out / "model.pt", out / "checkpoints", out / "run.json", out / "train.json",
                           out / "history.csv", out / "curve.png", "benchmark")
        start = time.perf_counter()
        setup = build(settings, root, info)
        progress = Progress()
        fit(setup, progress, paths, _NoLog())
        seconds = time.perf_counter() - start
        finish(setup, progress, paths, _NoLog(), {})
        model = read_model(paths.model_out)
    # The model's own detection settings (its recipe's), else the params' (as ``ssd evaluate`` resolves them).
    own = {"evaluate.nms_threshold": evaluate.nms_threshold, "evaluate.nms": evaluate.nms, **file_settings(model)}
    val = load_dataset(root, "val", image_size, classes)
    preds, _ = run_model(model.net, val.images, val.labels, own["evaluate.nms_threshold"],
                         per_class=own["evaluate.nms"] == "per_class")
    scale = torch.tensor([1.0, 1.0, *[image_size] * 4])
    detection = {k: own[k] for k in ("evaluate.nms", "evaluate.nms_threshold")}
    return [p * scale for p in preds], seconds, {"detection": detection, "anchors": model.net.config.sizes,
                                                  "ratios": model.net.config.ratios}


class _NoLog:
    """The loop's run log, logging nowhere (the benchmark tracks nothing in MLflow)."""
    run_id = ""

    def log_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Path) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def write_run_file(self, path: Path) -> None:
        pass


def run_one(system: str, root: Path, classes: Sequence[str], image_size: int, epochs: int, seed: int,
            work: Path) -> dict[str, Any]:
    """Train and score one system once; writes ``<name>.json`` and ``<name>.pt`` under ``work``."""
    names, targets = ground_truth(root, classes, image_size)
    extra: dict[str, Any] = {}
    if system in RECIPES:
        preds, seconds, extra = train_project(root, classes, image_size, epochs, seed, system)
    else:
        from benchmarks import peer_yolo

        preds, seconds = peer_yolo.train_and_predict(root, classes, image_size, epochs, seed, names)
    result = {"settings": run_settings(system, root, classes, image_size, epochs, seed), "train_seconds": seconds,
              **score(preds, targets, classes), **extra}
    name = run_name(system, image_size, seed)
    torch.save({"names": names, "preds": preds}, work / f"{name}.pt")
    (work / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_name(system: str, image_size: int, seed: int) -> str:
    return f"{system}-{image_size}-s{seed}"


def run_settings(system: str, root: Path, classes: Sequence[str], image_size: int, epochs: int,
                 seed: int) -> dict[str, Any]:
    """What a result was measured with: a stored result counts only if all of it is the same."""
    return {"system": system, "data": str(root.resolve()), "classes": list(classes), "image_size": image_size,
            "epochs": epochs, "seed": seed, "code": code_fingerprint(system)}


def code_fingerprint(system: str) -> str:
    """SHA-1 of the code a run of ``system`` depends on: the scoring (this module's ``ground_truth`` and
    ``score``, ``ssd.engine.metrics``' COCO mAP), and the project (``ssd/``, ``params.yaml``, this
    module's training) or the peer (``benchmarks.peer_yolo`` and the ultralytics version)."""
    import hashlib
    import inspect

    from ssd.engine import metrics

    digest = hashlib.sha1()
    for fn in (ground_truth, score, metrics.coco_map, metrics.per_class_ap):
        digest.update(inspect.getsource(fn).encode())
    if system in RECIPES:
        digest.update(inspect.getsource(train_project).encode())
        for path in sorted((PROJECT / "ssd").rglob("*.py")) + [PROJECT / "params.yaml"]:
            digest.update(path.relative_to(PROJECT).as_posix().encode() + path.read_bytes())
    else:
        from importlib.metadata import PackageNotFoundError, version

        from benchmarks import peer_yolo

        digest.update(Path(peer_yolo.__file__).read_bytes())
        try:
            digest.update(version("ultralytics").encode())
        except PackageNotFoundError:
            pass
    return digest.hexdigest()


def cached(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The result at ``path`` if it was measured with ``settings``."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("settings") == settings else None


def launch(system: str, args: argparse.Namespace, image_size: int, seed: int) -> dict[str, Any]:
    """One run in a child process (its own threads and memory), unless its result is already there."""
    name = run_name(system, image_size, seed)
    found = cached(args.work / f"{name}.json", run_settings(system, args.data, args.classes, image_size,
                                                            args.epochs, seed))
    if found is not None:
        print(f"{name}: reused {args.work / (name + '.json')}", file=sys.stderr, flush=True)
        return found
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(PROJECT)}
    command = [sys.executable, "-m", "benchmarks.peers", str(args.data), "--classes", *args.classes,
               "--epochs", str(args.epochs), "--work", str(args.work), "--threads", str(args.threads),
               "--one", system, str(image_size), str(seed)]
    with open(args.work / f"{name}.log", "w") as log:
        done = subprocess.run(command, env=env, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{name} failed (exit {done.returncode}): see {args.work / (name + '.log')}")
    result = json.loads((args.work / f"{name}.json").read_text())
    print(f"{name}: mAP@0.5 {result['map_50']:.3f} mAP {result['map']:.3f} ({result['train_seconds']:.0f} s)",
          file=sys.stderr, flush=True)
    return result


def table(results: dict[tuple[str, int], list[dict[str, Any]]], classes: Sequence[str]) -> str:
    """A Markdown table: per system and image size, the mean over seeds (and each seed) of mAP@0.5 and
    mAP@[.5:.95], each class's mean AP@0.5 / AP, and the mean training wall time."""
    head = ["system", "px", "mAP@0.5 mean (seeds)", "mAP@[.5:.95] mean (seeds)",
            *[f"AP@0.5 / AP {c}" for c in classes], "train s (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (system, size), runs in results.items():
        def cell(key: str) -> str:
            values = [r[key] for r in runs]
            return f"{statistics.fmean(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})"
        per_class = [f"{statistics.fmean(r['per_class'][c]['ap50'] for r in runs):.3f} / "
                     f"{statistics.fmean(r['per_class'][c]['ap'] for r in runs):.3f}" for c in classes]
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        lines.append(f"| {system} | {size} | {cell('map_50')} | {cell('map')} | {' | '.join(per_class)} | {seconds:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="dataset folder: train/ and val/, each images/ and label.csv")
    parser.add_argument("--classes", nargs="+", required=True, help="class names, in label order")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", default=[*RECIPES, *PEERS], choices=[*RECIPES, *PEERS])
    parser.add_argument("--work", type=Path, default=None, help="results of each run (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the table (Markdown) and the results (JSON beside it) here too")
    parser.add_argument("--one", nargs=3, metavar=("SYSTEM", "SIZE", "SEED"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data = args.data.resolve()
    if args.one:
        torch.set_num_threads(args.threads)
        system, size, seed = args.one
        run_one(system, args.data, args.classes, int(size), args.epochs, int(seed), args.work)
        return 0
    from benchmarks import peer_yolo

    systems = list(args.systems)
    if "yolov8n" in systems and not peer_yolo.available():
        print(f"benchmarks.peers: yolov8n skipped: ultralytics is not installed ({peer_yolo.INSTALL})", file=sys.stderr)
        systems.remove("yolov8n")
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        args.work = (args.work or Path(tmp)).resolve()
        args.work.mkdir(parents=True, exist_ok=True)
        jobs = [(s, size, seed) for size in args.image_sizes for s in systems for seed in args.seeds]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = list(pool.map(lambda job: launch(job[0], args, job[1], job[2]), jobs))
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for (system, size, _), result in zip(jobs, done):
        results.setdefault((system, size), []).append(result)
    text = table(results, args.classes)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps([r for r in done], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
