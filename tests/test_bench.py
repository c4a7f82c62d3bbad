"""`ssd bench`: the seed's reimplementation matches ours, and the smoke run measures everything."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from ssd.bench import SeedTinySSD, bench_dvc_repro, realistic_scores
from ssd.model import TinySSD

DVC = str(Path(sys.executable).with_name("dvc"))


def test_seed_model_is_ours_layer_for_layer():
    """The seed side of the benchmark runs the same network: same weights give the same outputs."""
    torch.manual_seed(0)
    ours, seed = TinySSD(1), SeedTinySSD(1)
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
    proc = subprocess.run([sys.executable, "-m", "ssd", "bench", "--smoke", "--out", str(out),
                           "--project", str(project), "--model", str(tmp_path / "none.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "multibox_detection" in proc.stdout and "dvc repro" in proc.stdout
    report = json.loads(out.read_text())
    assert report["smoke"] and report["sizes"]["image_size"] == 64

    seed, ours = report["train"]["seed"], report["train"]["auto"]
    for r in (seed, ours):
        assert math.isfinite(r["examples_per_sec"]) and r["examples_per_sec"] > 0
        assert r["peak_rss_mb"] > 100  # a process that imported torch
    assert ours["precision"] in ("fp32", "bf16")  # auto resolved to what this machine runs
    assert math.isclose(ours["speedup_vs_seed"], ours["examples_per_sec"] / seed["examples_per_sec"])
    for key, ours_key, seed_key in (("detection", "ours_ms_per_image", "seed_ms_per_image"),
                                    ("target", "ours_ms", "seed_ms"), ("predict", "ours_ms", "seed_ms")):
        r = report[key]
        assert r[ours_key] > 0 and r[seed_key] > 0
        assert math.isclose(r["speedup_vs_seed"], r[seed_key] / r[ours_key])
    repro = report["dvc_repro"]
    assert repro["note"] == "nothing changed" and 0 < repro["seconds"] < 60
