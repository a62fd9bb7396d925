"""examples/qat_finetune.py runs end to end (a few steps on the real SmolLM2-135M, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from assets import smollm2_gguf_path  # noqa: E402


@pytest.mark.slow
def test_qat_example_runs(tmp_path):
    smollm2_gguf_path()  # skips without the asset
    spec = importlib.util.spec_from_file_location("qat_finetune", ROOT / "examples" / "qat_finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "qat.json"
    rc = mod.main(["--steps", "3", "--batch", "2", "--seq", "32", "--calib-size", "4", "--calib-seq", "64",
                   "--eval-windows", "2", "--eval-seq", "64", "--log-every", "1", "--json", str(out),
                   "--export-path", str(tmp_path / "export")])
    assert rc == 0
    r = json.loads(out.read_text())
    for k in ("ppl_fp", "ppl_ptq", "ppl_qat"):
        assert math.isfinite(r[k]) and r[k] > 1
    assert r["ppl_ptq"] > r["ppl_fp"]  # NVFP4 W4A4 costs something before training
    assert r["qat"]["steps_per_s"] > 0 and r["backend"] in ("cpu", "gpu", "tpu")
    assert (tmp_path / "export" / "hf_quant_config.json").is_file()
