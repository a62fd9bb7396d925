"""The benchmark scripts run and write their JSON (smoke test on tiny shapes: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("division", ["exact", "hardware"])
def test_bench_numerics_writes_its_report(tmp_path, division):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_numerics.py"), "--size", "32", "48", "--iters", "2",
           "--warmup", "1", "--division", division, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["division"] == division and report["shape"] == [32, 48]
    assert [r["kernel"] for r in report["results"]] == [
        "fp8.fake_quant", "fp8.quantize", "nvfp4.fake_quant_dynamic", "nvfp4.quantize"]
    assert all(r["seconds"] > 0 for r in report["results"])


def test_bench_vs_modelopt_needs_a_gpu():
    """Without a CUDA GPU it stops with a one-line error, not a traceback."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_modelopt.py"), "--size", "32", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
    assert proc.returncode != 0
    assert "error: needs" in proc.stderr and "Traceback" not in proc.stderr
