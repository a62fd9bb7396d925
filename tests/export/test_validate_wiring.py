"""The validator inside the exporter and the loader: ``export_hf`` never publishes a checkpoint with a
finding; ``load_quantized`` / ``jaxquant eval`` refuse one whose numbers are corrupt (with the finding)
and only warn about what serving engines would reject. Real tiny checkpoints, real exports."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxquant as jq
from jaxquant.cli import main
from jaxquant.io.safetensors import SafetensorsFile, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_cli import cli_files  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    files = cli_files(tmp_path_factory.mktemp("wiring"))
    out = Path(files["root"]) / "nvfp4"
    rc = main(["ptq", "--model", files["model"], "--dataset", files["calib"], "--calib-size", "8", "--calib-seq", "24",
               "--batch-size", "4", "--eval-windows", "0", "--qformat", "nvfp4", "--kv-cache-qformat", "fp8",
               "--export-path", str(out), "--quiet"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert rc == 0
    return {**files, "export": out}


def _calibrated(setup, recipe):
    loaded = jq.load_hf(setup["model"], dtype="float32")
    ids = np.random.default_rng(0).integers(4, 60, (4, 16)).astype(np.int32)
    r = jq.quantize(loaded.model, recipe, (ids, np.ones_like(ids)), batch_size=2, progress=False)
    return loaded, r


def _rewrite(src: Path, dst: Path, key: str, fn) -> Path:
    shutil.copytree(src, dst)
    for p in dst.glob("*.safetensors"):
        f = SafetensorsFile(p)
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
        meta = dict(f.metadata)
        f.close()
        if key in tensors:
            tensors[key] = fn(tensors[key])
            save_file(tensors, p, meta)
    return dst


def test_intact_export_validates_and_loads(setup):
    assert jq.validate_checkpoint(setup["export"]).ok
    jq.load_quantized(setup["export"], dtype="float32")


def test_exporter_refuses_a_kv_only_checkpoint_vllm_cannot_load(setup, tmp_path):
    """quant_algo null + kv FP8: vLLM raises on it (quant-algo-unsupported); nothing is published."""
    recipe = {"algorithm": "max", "quant_cfg": [{"quantizer_name": "*", "enable": False},
                                                 {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": [4, 3]}}]}
    loaded, r = _calibrated(setup, recipe)
    with pytest.raises(jq.ExportError, match=r"not published.*quant-algo-unsupported"):
        jq.export_hf(loaded, tmp_path / "out", resolution=r)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary directory


def test_exporter_refuses_an_unquantized_model_unless_asked(setup, tmp_path):
    recipe = {"algorithm": "max", "quant_cfg": [{"quantizer_name": "*", "enable": False}]}
    loaded = jq.load_hf(setup["model"], dtype="float32")
    jq.apply_recipe(loaded.model, recipe, warn=False)
    with pytest.raises(jq.ExportError, match="nothing in this model is quantized"):
        jq.export_hf(loaded, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    jq.export_hf(loaded, tmp_path / "plain", allow_unquantized=True)
    assert (tmp_path / "plain" / "config.json").is_file()
    assert not (tmp_path / "plain" / "hf_quant_config.json").exists()
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


@pytest.mark.parametrize("key, value, rule", [
    ("model.layers.0.mlp.up_proj.weight_scale_2", np.nan, "scale-nonfinite"),
    ("model.layers.1.self_attn.q_proj.input_scale", 0.0, "scale-nonpositive"),
    ("model.layers.1.self_attn.k_proj.k_scale", -1.0, "scale-nonpositive"),
])
def test_loader_and_eval_refuse_corrupt_scales(setup, tmp_path, capsys, key, value, rule):
    bad = _rewrite(setup["export"], tmp_path / "bad", key, lambda a: np.full_like(a, value))
    with pytest.raises(jq.CheckpointError, match=rf"{key}: \[{rule}\]"):
        jq.load_quantized(bad, dtype="float32")
    rc = main(["eval", "--model", str(bad), "--eval-dataset", str(setup["eval"]), "--eval-windows", "1",
               "--eval-seq", "32"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, err = capsys.readouterr()
    assert rc == 2 and f"[{rule}]" in err and key in err and "perplexity: " not in out


def test_loader_warns_about_serving_findings_but_loads(setup, tmp_path, caplog):
    d = tmp_path / "stale"
    shutil.copytree(setup["export"], d)
    hq = json.loads((d / "hf_quant_config.json").read_text())
    hq["quantization"]["exclude_modules"].append("model.layers.9.mlp*")  # a stale entry: no such layer
    (d / "hf_quant_config.json").write_text(json.dumps(hq))
    with caplog.at_level(logging.WARNING):
        jq.load_quantized(d, dtype="float32")
    assert any("exclude-unmatched" in r.getMessage() for r in caplog.records)
