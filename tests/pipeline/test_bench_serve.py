"""benchmarks/serve.py: a smoke run starts a real `ssd serve` on a registered model and measures every case."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serve import CASES, SMOKE

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a server process


def test_smoke_serve_bench_measures_every_case(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--smoke", "--workers", "1", "--clients", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["image_size"] == 64 and report["clients"] == 2
    (server,) = report["servers"]
    assert server["workers"] == 1 and server["exit_code_on_sigterm"] == 143
    assert 0 < server["ready_s"] < 300 and 100 < server["ready_rss_mib"] <= server["peak_rss_mib"]  # torch imported
    assert set(server["cases"]) == {case for case, _, _ in CASES}
    for case, per_request, concurrent in CASES:
        r = server["cases"][case]
        assert (r["requests"], r["failed"]) == (SMOKE["requests"][case], 0), case
        assert r["images_per_request"] == per_request and r["clients"] == (2 if concurrent else 1)
        assert r["server_cpu_ms_per_image"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] and math.isclose(
            r["images_per_s"], r["requests"] * per_request / r["wall_s"])
    assert "batch32" in proc.stdout and f"wrote {out}" in proc.stdout
