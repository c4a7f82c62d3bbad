"""benchmarks/: the seed's code is the book's, the smoke run measures everything, and without d2l the
benchmark says what is missing in one line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import seed as book
from benchmarks.bench import bench_dvc_repro, realistic_scores
from ssd.core.model import TinySSD

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))


def _run_bench(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
               module: str = "benchmarks.bench") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_seed_model_is_ours_layer_for_layer():
    """The seed's network is ours: the same weights give the same outputs."""
    torch.manual_seed(0)
    ours, seed = TinySSD(1), book.TinySSD(1)
    seed.load_state_dict(ours.state_dict())
    x = torch.rand(2, 3, 64, 64) * 255
    for a, b in zip(ours(x), seed(x)):
        assert torch.equal(a, b)


def test_realistic_scores_are_mostly_low():
    probs = realistic_scores(4, 5444, torch.Generator().manual_seed(0))
    assert probs.shape == (4, 2, 5444)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4, 5444))
    low = (probs[:, 1] < 0.01).float().mean()
    assert 0.85 < low < 0.95 and (probs[:, 1] >= 0.5).any()


def test_dvc_repro_not_measured_without_a_reproduced_pipeline(tmp_path):
    result = bench_dvc_repro(tmp_path)
    assert result["seconds"] is None and "not measured" in result["note"]


def test_without_d2l_one_line_says_what_to_install(tmp_path):
    # A d2l that cannot be imported, found first on the path: what a machine without it sees.
    (tmp_path / "d2l").mkdir()
    (tmp_path / "d2l" / "__init__.py").write_text("raise ImportError('No module named d2l')\n")
    proc = _run_bench("--smoke", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "d2l" in lines[0] and "pip install --no-deps d2l==1.0.3" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _dvc_project(root: Path) -> Path:
    """A real DVC project whose one-stage pipeline has been reproduced."""
    root.mkdir()
    (root / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n    outs:\n      - out.txt\n")
    for cmd in (["init", "--no-scm", "-q"], ["repro", "-q"]):
        subprocess.run([DVC, *cmd], cwd=root, check=True, capture_output=True)
    return root


def test_smoke_bench_measures_everything(tmp_path):
    project = _dvc_project(tmp_path / "project")
    out = tmp_path / "bench.json"
    proc = _run_bench("--smoke", "--out", str(out), "--project", str(project), "--model", str(tmp_path / "none.pt"),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "multibox_detection" in proc.stdout and "predict a folder" in proc.stdout and "dvc repro" in proc.stdout
    report = json.loads(out.read_text())
    assert report["smoke"] and report["sizes"]["image_size"] == 64
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert isinstance(report["cpu"]["bf16_native"], bool)

    seed, ours = report["train"]["seed"], report["train"]["default"]
    for r in (seed, ours):
        assert math.isfinite(r["examples_per_sec"]) and r["examples_per_sec"] > 0
        assert r["peak_rss_mb"] > 100  # a process that imported torch
    assert ours["precision"] in ("fp32", "bf16", "fp16")  # `auto` resolved to what this machine runs
    assert ours["channels_last"] is True  # the default of params.yaml (none in the project: the package's)
    assert math.isclose(ours["speedup_vs_seed"], ours["examples_per_sec"] / seed["examples_per_sec"])
    assert math.isclose(ours["cpu_speedup_vs_seed"], ours["examples_per_cpu_sec"] / seed["examples_per_cpu_sec"])
    for key, ours_key, seed_key in (("detection", "ours_ms_per_image", "seed_ms_per_image"),
                                    ("target", "ours_ms", "seed_ms")):
        r = report[key]
        assert r[ours_key] > 0 and r[seed_key] > 0
        assert math.isclose(r["speedup_vs_seed"], r[seed_key] / r[ours_key])
    p = report["predict"]
    assert p["images"] == 4 and p["ours_images_per_sec"] > 0 and p["seed_images_per_sec"] > 0
    assert math.isclose(p["speedup_vs_seed"], p["ours_images_per_sec"] / p["seed_images_per_sec"])
    repro = report["dvc_repro"]
    assert repro["note"] == "nothing changed" and 0 < repro["seconds"] < 60


def test_parity_pairs_every_variant_with_fp32_of_the_same_seed(tmp_path):
    """The parity report's differences are per seed against plain fp32 NCHW, and the seeds really differ."""
    out = tmp_path / "parity.json"
    proc = _run_bench("--train", "8", "--val", "4", "--image-size", "64", "--epochs", "1", "--seeds", "0", "1",
                      "--variants", "default", "fp32", "nudged", "--out", str(out), module="benchmarks.parity")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    runs, summary = report["runs"], report["summary"]
    assert set(runs) == {"fp32_nchw", "default", "fp32", "nudged"}
    assert [(r["precision"], r["channels_last"]) for r in runs["fp32"]] == [("fp32", True)] * 2
    assert [r["channels_last"] for r in runs["fp32_nchw"]] == [False, False]
    # One float step in the initial weights changes the run, and nothing else does.
    assert [r["final_loss"] for r in runs["nudged"]] != [r["final_loss"] for r in runs["fp32_nchw"]]
    assert runs["fp32_nchw"][0]["final_loss"] != runs["fp32_nchw"][1]["final_loss"]  # seeds differ
    for name, rows in runs.items():
        expected = [r["map_50"] - ref["map_50"] for r, ref in zip(rows, runs["fp32_nchw"])]
        assert summary[name]["difference"] == expected
        assert math.isclose(summary[name]["mean_difference"], sum(expected) / 2)
    assert summary["fp32_nchw"]["difference"] == [0.0, 0.0]


def _conv_flops_per_example(image_size: int) -> tuple[int, int]:
    """Forward FLOPs of TinySSD's convolutions for one image (2 * Cin * k * k * Cout per output
    pixel), all of them and the first one alone, from the modules' shapes."""
    model, shapes = TinySSD(1), {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, (m, o.shape)))
    model(torch.zeros(1, 3, image_size, image_size))
    flops = {name: 2 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] * out[1:].numel()
             for name, (m, out) in shapes.items()}
    return sum(flops.values()), flops["blk_0.0.0"]


def test_profile_counts_each_convolution_once_in_every_precision():
    """FLOPs per example are forward + weight gradients + input gradients (none for the image
    itself): 3F - F(first conv), the same under bf16 autocast (whose extra conv2d call the
    profiler's own counter saw twice)."""
    forward, first = _conv_flops_per_example(64)
    expected = (3 * forward - first) / 1e9
    for precision in ("fp32", "bf16"):
        proc = _run_bench("--steps", "1", "--batch-size", "2", "--image-size", "64", "--precision", precision,
                          "--matmul-size", "128", module="benchmarks.profile_train")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{precision}, channels_last, batch 2, 64x64"), proc.stdout
        counted = float(proc.stdout.split("convolutions: ")[1].split(" GFLOP/example")[0])
        assert math.isclose(counted, expected, rel_tol=1e-3), (counted, expected, proc.stdout)
        assert f"{'bfloat16' if precision == 'bf16' else 'float32'} matmul 128x128" in proc.stdout
