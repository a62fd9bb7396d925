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


@pytest.mark.parametrize("division", ["exact", pytest.param("hardware", marks=pytest.mark.slow)])
def test_bench_numerics_writes_its_report(tmp_path, division):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_numerics.py"), "--size", "128", "256", "--iters", "2",
           "--warmup", "1", "--division", division, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["division"] == division and report["shape"] == [128, 256]
    from jaxquant.formats.registry import FORMATS, QUANTIZER_FORMATS

    rows = report["results"]
    assert (rows[0]["kind"], rows[0]["vs_copy"]) == ("copy", 1.0)
    assert [r["format"] for r in rows if r["kind"] == "fake_quant"] == list(QUANTIZER_FORMATS)  # every one
    assert [r["format"] for r in rows if r["kind"] == "export"] == list(FORMATS)
    assert all(r["seconds"] > 0 for r in report["results"])


def test_bench_vs_modelopt_needs_a_gpu():
    """Without a CUDA GPU it stops with a one-line error, not a traceback."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_modelopt.py"), "--size", "32", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
    assert proc.returncode != 0
    assert "error: needs" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_e2e_vs_modelopt_on_cpu(tmp_path):
    """A tiny Llama through both tools on CPU (ModelOpt's max calibration and export need no CUDA) in float32:
    the report has every phase, and the two exports agree (weights byte for byte, activation scales to float32
    rounding, the same hf_quant_config.json)."""
    pytest.importorskip("torch")
    pytest.importorskip("modelopt.torch.quantization")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e_vs_modelopt.py"), "--shape", "tiny", "--calib-size",
           "8", "--calib-seq", "32", "--batch-size", "4", "--dtype", "float32", "--out", str(tmp_path),
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_CPU_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench_e2e_tiny.json").read_text())
    (run,) = report["runs"]
    assert run["recipe"] == "general/ptq/fp8_qkvo-nvfp4_mlp"
    for tool in ("modelopt", "jaxquant"):
        r = run[tool]
        assert r["ok"], r.get("log_tail")
        assert {"import", "load model", "export"} <= set(r["phases"]) and r["process_wall_s"] > 0
        assert r["export_bytes"] > 0 and r["calib_tokens_per_s"] > 0
    cmp_ = run["compare"]
    assert cmp_["n_only_in_modelopt"] == cmp_["n_only_in_jaxquant"] == 0
    assert cmp_["weight_side"]["identical_bytes_fraction"] == 1.0
    assert cmp_["activation_scales"]["input_scale"]["max_rel_diff"] < 1e-5
    assert cmp_["hf_quant_config_equal"]
    assert "process wall" in proc.stdout


def test_bench_synthetic_on_cpu(tmp_path):
    """A tiny synthetic Gemma 4 through load, calibration with the early export, and the export's end."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_synthetic.py"), "--shape", "tiny-gemma4", "--calib-size",
           "4", "--calib-seq", "16", "--batch-size", "2", "--dtype", "float32", "--export-path",
           str(tmp_path / "export"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench_synthetic_tiny-gemma4.json").read_text())
    assert report["export_bytes"] > 0 and report["calib_tokens_per_s"] > 0 and report["parameters"] > 0
    assert (tmp_path / "export" / "hf_quant_config.json").is_file()


def test_bench_synthetic_one_algorithm(tmp_path):
    """``--algorithm`` calibrates with a ``bench_quality.ALGORITHMS`` entry (GPTQ: the weights change) and says so."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_synthetic.py"), "--shape", "tiny", "--recipe",
           "configs/ptq/presets/model/nvfp4", "--algorithm", "gptq", "--calib-size", "4", "--calib-seq", "16",
           "--batch-size", "2", "--dtype", "float32", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench_synthetic_tiny_gptq.json").read_text())
    assert report["algorithm"] == "gptq" and report["timings"]["search"] > 0
    bad = subprocess.run(cmd[:-2] + ["--algorithm", "smoothquant"], capture_output=True, text=True, timeout=600,
                         env=_CPU_ENV)
    assert bad.returncode != 0 and "does not apply" in bad.stderr


def test_probe_ppl_noise_moves_each_scale_one_ulp(tmp_path):
    """Every ``input_scale`` moves exactly one float32 ulp, fused siblings (q/k/v, gate/up) the same way; other
    tensors are untouched."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from probe_ppl_noise import perturb

    src = tmp_path / "src"
    src.mkdir()
    names = [f"model.layers.{i}.{p}.input_scale" for i in range(8)
             for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    tensors = {n: torch.tensor(0.1 + i / 7, dtype=torch.float32) for i, n in enumerate(names)}
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.ones(4, 4, dtype=torch.bfloat16)
    save_file(tensors, src / "model.safetensors")
    assert perturb(src, tmp_path / "dst", seed=3) == len(names)
    out = load_file(tmp_path / "dst" / "model.safetensors")
    step = {}
    for n in names:
        a, b = np.float32(tensors[n].item()), np.float32(out[n].item())
        assert b in (np.nextafter(a, np.float32(np.inf)), np.nextafter(a, np.float32(-np.inf))), n
        step[n] = b > a
    for i in range(8):
        q = f"model.layers.{i}.self_attn."
        assert step[q + "q_proj.input_scale"] == step[q + "k_proj.input_scale"] == step[q + "v_proj.input_scale"]
        m = f"model.layers.{i}.mlp."
        assert step[m + "gate_proj.input_scale"] == step[m + "up_proj.input_scale"]
    assert len(set(step.values())) == 2  # both directions drawn
    assert torch.equal(out["model.layers.0.mlp.down_proj.weight"], tensors["model.layers.0.mlp.down_proj.weight"])


def test_bench_synthetic_streamed_on_cpu(tmp_path):
    """``--stream`` (the mode for the Llama-3.1-70B shape): a tiny synthetic Llama streamed layer by layer writes the
    same export bytes as the whole-model run, and reports the phases, peak RSS and export size."""
    runs = {}
    for mode in ("plain", "stream"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_synthetic.py"), "--shape", "tiny", "--calib-size", "4",
               "--calib-seq", "16", "--batch-size", "2", "--dtype", "float32", "--export-path",
               str(tmp_path / mode), "--out", str(tmp_path)] + (["--stream"] if mode == "stream" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[mode] = {p.name: p.read_bytes() for p in (tmp_path / mode).iterdir()}
    report = json.loads((tmp_path / "bench_synthetic_tiny_streamed.json").read_text())
    assert report["streamed"] and report["export_bytes"] > 0 and report["host_peak_rss_bytes"] > 0
    assert set(report["phases_s"]) >= {"forward passes", "export (waits on the writer)"}
    assert runs["plain"]["model.safetensors"] == runs["stream"]["model.safetensors"]
    assert runs["plain"] == runs["stream"]


# ----------------------------------------------------------------------------------------------- bench_quality
def _bench_quality():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality

    return bench_quality


def test_bench_quality_cells_are_data_driven():
    """Which (recipe, algorithm) cells exist, and the static NVFP4 weights of the weight-searching algorithms."""
    bq = _bench_quality()
    nvfp4 = bq.recipe_config(bq.RECIPES["nvfp4_default"])
    int8 = bq.recipe_config(bq.RECIPES["int8_sq"])
    assert bq.weight_kinds(nvfp4) == {"nvfp4"} and bq.weight_kinds(int8) == {"int8"}
    assert bq.weight_kinds(bq.recipe_config(bq.RECIPES["fp8_qkvo-nvfp4_mlp"])) == {"fp8", "nvfp4"}
    assert bq.cell_config(int8, "awq_lite") is None and bq.cell_config(nvfp4, "smoothquant") is None
    mse = bq.cell_config(nvfp4, "mse")
    w = [e["cfg"] for e in mse["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
    i = [e["cfg"] for e in mse["quant_cfg"] if e.get("quantizer_name") == "*input_quantizer"]
    assert w[0]["block_sizes"] == {-1: 16, "type": "static", "scale_bits": (4, 3)}  # int key, (E, M)
    assert i[0]["block_sizes"]["type"] == "dynamic"  # activations stay dynamic
    assert mse["algorithm"] == {"method": "mse", "fp8_scale_sweep": True}
    assert nvfp4["quant_cfg"][1]["cfg"]["block_sizes"]["type"] == "dynamic"  # the recipe itself is untouched
    assert bq.cell_config(int8, "max")["algorithm"] == "max"
    gptq = bq.cell_config(nvfp4, "gptq")  # gptq refuses dynamic weight blocks: the cell makes them static
    assert [e["cfg"] for e in gptq["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"][0][
        "block_sizes"]["type"] == "static"
    combo = bq.cell_config(int8, "smoothquant+gptq")  # a list of algorithms, as ModelOpt's algorithm: [...]
    assert bq.methods(combo["algorithm"]) == ["smoothquant", "gptq"] and bq.jaxquant_has("smoothquant+gptq")
    assert bq.cell_config(int8, "svdquant") is None and bq.cell_config(nvfp4, "svdquant")["algorithm"]["lowrank"]


def test_bench_quality_table_and_json(tmp_path, monkeypatch, capsys):
    """A tiny Llama, INT8 SmoothQuant with an algorithm jaxquant does not register: its cells say "not available",
    the others have both tools' perplexity (ModelOpt's export read by jaxquant's loader) and the JSON is written."""
    pytest.importorskip("torch")
    pytest.importorskip("modelopt.torch.quantization")
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_cli import write_tiny_checkpoint

    bq = _bench_quality()
    monkeypatch.setitem(bq.ALGORITHMS, "no_such_algorithm", ({"method": "no_such_algorithm"}, False, ("int8",)))
    model = write_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "q.json"
    common = ["--model", str(model), "--recipes", "int8_sq", "--algorithms", "max,no_such_algorithm,awq_lite",
              "--calib-size", "4", "--calib-seq", "16", "--batch-size", "4", "--eval-windows", "2",
              "--eval-seq", "16", "--out", str(out)]
    assert bq.main(common + ["--tools", "jaxquant"]) == 0
    first = {c["algorithm"]: c for c in json.loads(out.read_text())["cells"]}
    assert "modelopt" not in first["max"]
    capsys.readouterr()
    assert bq.main(common + ["--tools", "jaxquant,modelopt", "--resume"]) == 0  # runs only ModelOpt's sides
    report = json.loads(out.read_text())
    assert {c["algorithm"]: c for c in report["cells"]}["max"]["jaxquant"] == first["max"]["jaxquant"]
    assert set(report["baseline_ppl"]) == {"wiki", "lee"}
    cells = {c["algorithm"]: c for c in report["cells"]}
    assert set(cells) == {"max", "no_such_algorithm"}  # awq_lite does not apply to INT8
    assert cells["no_such_algorithm"]["jaxquant"]["status"] == "not available"
    mx = cells["max"]
    assert mx["jaxquant"]["status"] == mx["modelopt"]["status"] == "ok", mx
    for t in ("wiki", "lee"):  # same calibration ids, same max amax, one evaluator: the same perplexity
        assert mx["jaxquant"]["ppl"][t] == pytest.approx(mx["modelopt"]["ppl"][t], rel=1e-4)
    table = capsys.readouterr().out
    assert "| int8_sq | no_such_algorithm | not available |" in table and "| int8_sq | max |" in table
    assert bq.main(["--table-only", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == table.strip().split("\n\n")[-1].strip()


def test_bench_quality_gptq_columns_equal_modelopts_loop():
    """On CPU the quality table runs ModelOpt's unfused GPTQ loop with the fake quant of the column it reads only
    (static NVFP4 blocks): the updated weight is bit-identical to ModelOpt's own ``gptq_blockwise_update``, which
    fake-quantizes the whole matrix (through the same numpy kernel emulation) once per column."""
    torch = pytest.importorskip("torch")
    cu = pytest.importorskip("modelopt.torch.quantization.utils.calib_utils")
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "numerics"))
    from _numerics_ref import triton_static_np

    bq = _bench_quality()
    rng = np.random.default_rng(0)
    rows, cols, bs = 24, 64, 16
    w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
    amax = w.abs().reshape(rows, cols // bs, bs).amax(-1) * 0.8  # clipping blocks, as a search would leave them
    amax[2, 1] = 0.0  # an all-zero block scale

    class Static:  # what GPTQ reads from ModelOpt's NVFP4StaticQuantizer
        _is_nvfp4_static_quantizer = True
        block_sizes = {-1: bs}

        def __init__(self):
            self.amax, self.global_amax = amax.reshape(-1, 1), amax.max()

        def __call__(self, x):
            y = triton_static_np(x.numpy().reshape(-1, bs), self.amax.numpy(), self.global_amax.numpy(), bs)
            return torch.from_numpy(y.reshape(x.shape))

    a = torch.from_numpy(rng.standard_normal((cols, 2 * cols)).astype(np.float32))
    h_inv = torch.linalg.cholesky(torch.linalg.inv(a @ a.T / cols + 0.1 * torch.eye(cols)), upper=True)
    theirs, ours = w.clone(), w.clone()
    cu.gptq_blockwise_update(theirs, h_inv, 32, Static())
    with bq.modelopt_nvfp4_on_cpu(True):
        cu.gptq_blockwise_update(ours, h_inv, 32, Static())
    assert cu.gptq_blockwise_update.__name__ == "gptq_blockwise_update"  # restored on exit
    assert not torch.equal(theirs, w)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


# ----------------------------------------------------------------------------------------------- bench_host_rss
def test_bench_host_rss_streamed_on_cpu(tmp_path):
    """A tiny transformers-written Llama through ``jaxquant ptq --layerwise`` (streamed) under ``/usr/bin/time -v``
    (or ``os.wait4``): the report has the run's peak RSS, wall time, export size and exact command line."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_cli import WORDS, write_tiny_checkpoint

    tok = write_tiny_checkpoint(tmp_path / "tok")
    out = tmp_path / "rss.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_host_rss.py"), "--hidden", "64", "--intermediate", "128",
           "--layers", "2", "--heads", "4", "--kv-heads", "2", "--calib-size", "4", "--calib-seq", "16",
           "--batch-size", "2", "--modes", "streamed", "--tokenizer", str(tok), "--work", str(tmp_path / "work"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_CPU_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["mode"] == "streamed" and run["returncode"] == 0
    assert "--layerwise" in run["command"] and "--no-stream" not in run["command"]
    assert run["checkpoint_bytes"] == report["checkpoint"]["checkpoint_bytes"] > 0
    assert run["peak_rss_bytes"] > 100e6 and run["wall_s"] > 0 and run["export_bytes"] > 0
    assert run["rss_over_checkpoint"] == run["peak_rss_bytes"] / run["checkpoint_bytes"]
    assert report["checkpoint"]["config"]["vocab_size"] == 4 + len(set(WORDS))  # the tokenizer's size
    assert not (tmp_path / "work" / "export-streamed").exists()  # deleted after the run
    assert "| streamed |" in proc.stdout


def test_bench_host_rss_reads_time_v():
    """GNU time's report: KiB to bytes, ``m:ss.ss`` and ``h:mm:ss`` to seconds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_host_rss import parse_time_v

    text = ("\tCommand being timed: \"python -m jaxquant.cli ptq\"\n"
            "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50\n"
            "\tMaximum resident set size (kbytes): 1698280\n")
    assert parse_time_v(text) == {"peak_rss_bytes": 1698280 * 1024, "wall_s": 62.5}
    assert parse_time_v(text.replace("1:02.50", "1:00:03"))["wall_s"] == 3603.0
    with pytest.raises(RuntimeError, match="Maximum resident set size"):
        parse_time_v("Command exited with non-zero status 1\n")
