"""Scale: training, validation and memory as the dataset grows, for each ``data.loader`` path.

    python -m benchmarks.scale [--sizes 1000 20000] [--loaders memory stream] [--nproc 1 2]
                               [--steps 10] [--image-size 256] [--out reports/scale.json]

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
* ``validate_images_per_s``: ``ssd validate``'s checks (``ssd.data.checks.validate``) over the set.

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


def build_set(base: Path, folder: Path, images: int) -> Path:
    """A dataset root whose train split has ``images`` images, hard links of ``base``'s."""
    from ssd.data.layout import IMAGES_DIR, LABEL_FILE

    root = folder / f"set{images}" / base.name
    shutil.copytree(base / "bananas_val", root / "bananas_val")
    src, dst = base / "bananas_train", root / "bananas_train"
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


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"model name\s*:\s*(.+)", text)
    return f"{found.group(1).strip() if found else 'unknown'}, {os.cpu_count()} logical CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--loaders", nargs="+", default=["memory", "stream"])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out", default="reports/scale.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--data", "--loader", "--result", "--launched"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, type=float if hidden == "--launched" else str)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        base = build_base(tmp, args.image_size)
        for size in args.sizes:
            data, args.size_now = build_set(base, tmp, size), size
            rows.append({"images": size, "validate": validate_rate(data, args.image_size)})
            print(json.dumps(rows[-1]), flush=True)
            for loader in args.loaders:
                for nproc in args.nproc:
                    rows.append(run_training(data, loader, nproc, args, tmp))
                    print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(data.parent)
    report = {"cpu": cpu_name(), "image_size": args.image_size, "steps": args.steps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
