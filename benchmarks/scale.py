"""Scale: training, validation and memory as the dataset grows, for each ``data.loader`` path.

    python -m benchmarks.scale [--sizes 1000 20000] [--loaders memory stream] [--nproc 1 2]
                               [--eval-images 1000] [--steps 10] [--image-size 256]
                               [--memory-limit-gib G] [--out reports/scale.json]

Builds one small synthetic banana set (``ssd.data.synthetic``), then sets of each ``--sizes`` train
images as hard links of its images (labels repeated: decoding costs what it would for distinct
files, the page cache aside). For each set, loader and process count it runs ``ssd train``'s own
setup (``ssd.engine.setup.build``: data, model, loader, with params.yaml's training defaults) and
step (``ssd.engine.step.train_step``) in fresh processes (``torchrun`` for more than one) and reports:

* ``first_step_s``: from launching the processes to the end of the first training step (interpreter
  and torch imports included: they cost the same on every path);
* ``rss_mib``: the peak resident memory (``VmHWM``) of each training process, and of its largest
  DataLoader worker;
* ``examples_per_s``: training examples per second over ``--steps`` steps after the first (all ranks);
* ``validate_images_per_s``: ``ssd validate``'s checks (``ssd.data.checks.validate``) over the set;
* for each ``--eval-images``, a validation split of that many linked images scored as ``ssd evaluate``
  scores it (``ssd.engine.evaluation.score``, streamed) by an untrained model in a fresh process (up to
  100 detections per image: the metrics' worst case): images/s of the model's pass (decoding
  included), the whole scoring's seconds (metrics included) and its peak ``VmHWM``.

A ``memory`` row whose decoded splits (``images x 3 x S x S`` bytes per process) would not fit in
``--memory-limit-gib`` beside :data:`STEP_GIB` per process (default: three quarters of the memory
available as the row starts) is not run, so the benchmark never takes the machine down: it is
projected (``projected``) from the stream row at its size plus the per-image memory and first-step
time the two loaders differed by at the largest size measured with both.

Every figure is measured on this machine; ``cpu`` names it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

BASE_TRAIN, BASE_VAL = 200, 50  # distinct generated images; larger sets link to these
STEP_GIB = 2  # a training process's own peak beside its data (2-process rows, docs/performance.md)


def vm_hwm_mib(pid: int | str = "self") -> float:
    """Peak resident memory of a process (``VmHWM``: unlike ``ru_maxrss``, reset by exec)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s*(\d+)", status).group(1)) / 1024


def build_base(folder: Path, image_size: int) -> Path:
    from ssd.data.synthetic import generate_archive

    archive = folder / "base.zip"
    generate_archive(archive, train=BASE_TRAIN, val=BASE_VAL, image_size=image_size)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(folder / "base")
    return next((folder / "base").rglob("bananas_train")).parent


def link_split(src: Path, dst: Path, images: int) -> None:
    """A split of ``images`` images at ``dst``: hard links of ``src``'s, their label rows repeated."""
    from ssd.data.layout import IMAGES_DIR, LABEL_FILE

    (dst / IMAGES_DIR).mkdir(parents=True)
    header, *rows = (src / LABEL_FILE).read_text().splitlines()
    by_name: dict[str, list[str]] = {}
    for row in rows:
        by_name.setdefault(row.split(",", 1)[0], []).append(row.split(",", 1)[1])
    names, out = list(by_name), [header]
    for i in range(images):
        name = names[i % len(names)]
        new = f"{i:06d}_{name}"
        os.link(src / IMAGES_DIR / name, dst / IMAGES_DIR / new)
        out += [f"{new},{rest}" for rest in by_name[name]]
    (dst / LABEL_FILE).write_text("\n".join(out) + "\n")


def build_set(base: Path, folder: Path, images: int) -> Path:
    """A dataset root whose train split has ``images`` images, hard links of ``base``'s."""
    root = folder / f"set{images}" / base.name
    shutil.copytree(base / "bananas_val", root / "bananas_val")
    link_split(base / "bananas_train", root / "bananas_train", images)
    return root


def child(args: argparse.Namespace) -> None:
    """One training process: setup, first step, ``--steps`` more; writes its figures to ``--result``."""

    from ssd.engine import distributed as dist
    from ssd.engine.precision import AUTOCAST_DTYPES
    from ssd.engine.setup import build, parallel
    from ssd.engine.step import train_step
    from ssd.util.params import load_settings

    info = dist.init_distributed()
    settings = load_settings(overrides=[f"data.loader={args.loader}", f"data.image_size={args.image_size}"])
    setup = build(settings, Path(args.data), info)
    net = parallel(setup.model, info, settings.train.compile)
    autocast = AUTOCAST_DTYPES.get(setup.precision)
    loader, device, steps = setup.loader, info.device, 0
    loader.sampler.set_epoch(0)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss, _ = train_step(net, setup.optimizer, setup.scaler, images, labels, autocast_dtype=autocast,
                             channels_last=settings.train.channels_last, epoch=1, step=steps + 1)
        float(loss)  # waits for the device
        if steps == 0:
            first, started = time.time() - args.launched, time.perf_counter()
        steps += 1
        if steps > args.steps:
            break
    seconds = time.perf_counter() - started
    iterator = getattr(loader, "_iterator", None)
    workers = [w.pid for w in getattr(iterator, "_workers", [])]
    result = {"rank": info.rank, "first_step_s": round(first, 2),
              "examples_per_s": round((steps - 1) * len(images) / seconds, 1),
              "rss_mib": round(vm_hwm_mib()), "worker_rss_mib": round(max((vm_hwm_mib(p) for p in workers),
                                                                          default=0)),
              "workers": len(workers), "loader": type(setup.dataset).__name__}
    Path(args.result).with_suffix(f".{info.rank}.json").write_text(json.dumps(result))
    dist.destroy_distributed()


def run_training(data: Path, loader: str, nproc: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result = tmp / f"{data.parent.name}-{loader}-{nproc}"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "benchmarks.scale", "--child", "--data", str(data), "--loader", loader,
                      "--image-size", str(args.image_size), "--steps", str(args.steps), "--result", str(result),
                      "--launched", repr(time.time())]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    ranks = [json.loads(result.with_suffix(f".{r}.json").read_text()) for r in range(nproc)]
    return {"images": args.size_now, "loader": loader, "nproc": nproc,
            "first_step_s": max(r["first_step_s"] for r in ranks),
            "examples_per_s": round(sum(r["examples_per_s"] for r in ranks), 1),
            "rss_mib_per_process": max(r["rss_mib"] for r in ranks),
            "worker_rss_mib": max(r["worker_rss_mib"] for r in ranks),
            "workers_per_process": ranks[0]["workers"], "dataset": ranks[0]["loader"]}


def validate_rate(data: Path, image_size: int) -> dict[str, Any]:
    from ssd.data.checks import check_workers, validate

    start = time.perf_counter()
    report, _ = validate(data, image_size)
    seconds = time.perf_counter() - start
    images = sum(s["images"] for s in report["splits"].values())
    return {"images": images, "seconds": round(seconds, 1), "images_per_s": round(images / seconds),
            "processes": check_workers()}


def eval_child(args: argparse.Namespace) -> None:
    """One ``ssd evaluate`` scoring: an untrained model over ``--data``'s validation split."""
    import torch

    from ssd.core.model import TinySSD
    from ssd.engine.evaluation import load_validation, score
    from ssd.util.params import load_settings

    settings = load_settings(overrides=[f"data.image_size={args.image_size}"])
    torch.manual_seed(0)
    net = TinySSD(len(settings.data.classes), classes=settings.data.classes, image_size=args.image_size)
    started = time.perf_counter()
    scores = score(net, load_validation(settings.data, args.data), settings.evaluate)
    result = {"eval_images": len(scores.preds), "images_per_s": round(scores.images_per_s, 1),
              "loop_s": round(scores.seconds, 1), "score_s": round(time.perf_counter() - started, 1),
              "rss_mib": round(vm_hwm_mib()), "workers": scores.workers,
              "detections": sum(len(p) for p in scores.preds)}
    Path(args.result).write_text(json.dumps(result))


def evaluate_rate(base: Path, tmp: Path, images: int, image_size: int) -> dict[str, Any]:
    root = tmp / f"eval{images}" / base.name
    link_split(base / "bananas_val", root / "bananas_val", images)
    result = tmp / f"eval{images}.json"
    subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child-eval", "--data", str(root),
                    "--image-size", str(image_size), "--result", str(result)],
                   check=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    shutil.rmtree(root.parent)
    return json.loads(result.read_text())


def available_gib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s*(\d+)", text).group(1)) / 2**20


def fits(images: int, nproc: int, image_size: int, limit_gib: float) -> bool:
    """Whether ``nproc`` processes, each with a decoded split and a step's own peak, fit in ``limit_gib``."""
    return (images * 3 * image_size ** 2 + STEP_GIB * 2**30) * nproc <= limit_gib * 2**30


def project(rows: list[dict[str, Any]], size: int, nproc: int) -> dict[str, Any]:
    """A ``memory`` row not run: the ``stream`` row at ``size`` plus the per-image memory and
    first-step time the two loaders differed by at the largest size both were measured at."""
    runs = {(r["images"], r["loader"], r["nproc"]): r for r in rows if "loader" in r and not r.get("projected")}
    both = [n for (n, loader, k) in runs if loader == "memory" and k == nproc and (n, "stream", k) in runs]
    stream = runs.get((size, "stream", nproc))
    row = {"images": size, "loader": "memory", "nproc": nproc, "projected": True}
    if not both or stream is None:
        return {**row, "note": "not run (would not fit), and nothing measured to project from"}
    n = max(both)
    memory, streamed = runs[(n, "memory", nproc)], runs[(n, "stream", nproc)]
    per_image_mib = (memory["rss_mib_per_process"] - streamed["rss_mib_per_process"]) / n
    per_image_s = (memory["first_step_s"] - streamed["first_step_s"]) / n
    return {**row, "projected_from": n, "per_image_kib": round(per_image_mib * 1024, 1),
            "per_image_ms": round(per_image_s * 1000, 2),
            "rss_mib_per_process": round(streamed["rss_mib_per_process"] + per_image_mib * size),
            "first_step_s": round(stream["first_step_s"] + per_image_s * size)}


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"model name\s*:\s*(.+)", text)
    return f"{found.group(1).strip() if found else 'unknown'}, {os.cpu_count()} logical CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 20000])
    parser.add_argument("--loaders", nargs="+", default=["memory", "stream"])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--eval-images", type=int, nargs="*", default=[1000])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--memory-limit-gib", type=float, default=None)
    parser.add_argument("--out", default="reports/scale.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-eval", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--data", "--loader", "--result", "--launched"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, type=float if hidden == "--launched" else str)
    args = parser.parse_args(argv)
    if args.child or args.child_eval:
        (child if args.child else eval_child)(args)
        return 0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        base = build_base(tmp, args.image_size)
        for images in args.eval_images:
            rows.append({"evaluate": evaluate_rate(base, tmp, images, args.image_size)})
            print(json.dumps(rows[-1]), flush=True)
        for size in args.sizes:
            data, args.size_now = build_set(base, tmp, size), size
            rows.append({"images": size, "validate": validate_rate(data, args.image_size)})
            print(json.dumps(rows[-1]), flush=True)
            # Streamed first: a memory row that is not run is projected from the stream row at its size.
            for loader in sorted(args.loaders, key=lambda kind: kind != "stream"):
                for nproc in args.nproc:
                    # The limit as the row starts: other jobs on the machine come and go.
                    limit = args.memory_limit_gib or available_gib() * 3 / 4
                    if loader == "memory" and not fits(size, nproc, args.image_size, limit):
                        rows.append({**project(rows, size, nproc), "memory_limit_gib": round(limit, 1)})
                    else:
                        rows.append(run_training(data, loader, nproc, args, tmp))
                    print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(data.parent)
    report = {"cpu": cpu_name(), "image_size": args.image_size, "steps": args.steps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
