"""``jaxquant ptq`` / ``jaxquant eval`` end to end on a tiny checkpoint written here (no torch, no assets), and
the CLI's error paths: one ``error:`` paragraph on stderr and exit status 2 (130 for Ctrl-C)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxquant.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_cli import cli_files, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return cli_files(tmp_path_factory.mktemp("cli"))


def _ptq(files, *extra):
    return ["ptq", "--model", files["model"], "--dataset", files["calib"], "--calib-size", "12", "--calib-seq", "24",
            "--batch-size", "4", "--eval-dataset", files["eval"], "--eval-windows", "2", "--eval-seq", "32", "--quiet",
            *extra]


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_ptq_end_to_end_prints_summary_ppl_and_timings(files, capsys, tmp_path):
    state = tmp_path / "state.safetensors"
    rc, out, err = _run(_ptq(files, "--save-calib-state", str(state)), capsys)
    assert rc == 0, err
    assert "backend cpu" in out
    assert "quantizer resolution" in out and "counts: fp8" in out  # hf_ptq's default --qformat fp8
    assert "calibration (max): 3 batches" in out
    assert "original" in out and "quantized" in out and "perplexity on" in out
    assert "time per phase" in out and "calibrate: forward passes" in out
    ppl = [float(line.split()[1]) for line in out.splitlines() if line.startswith(("original ", "quantized "))]
    assert len(ppl) == 2 and all(np.isfinite(ppl)) and abs(ppl[1] / ppl[0] - 1) < 0.2
    assert state.is_file()
    # --load-calib-state skips calibration and reproduces the quantized perplexity
    rc, out2, err = _run(_ptq(files, "--load-calib-state", str(state)), capsys)
    assert rc == 0, err
    assert "calibration state loaded" in out2 and "calibration (max)" not in out2
    ppl2 = [float(line.split()[1]) for line in out2.splitlines() if line.startswith(("original ", "quantized "))]
    np.testing.assert_allclose(ppl2, ppl, rtol=1e-4)  # equal on CPU; GPU reductions may reorder


def test_ptq_hf_ptq_spellings_and_presets(files, capsys):
    argv = ["ptq", "--pyt_ckpt_path", files["model"], "--dataset", files["calib"], "--calib_size", "8",
            "--calib_seq", "16", "--batch_size", "8", "--qformat", "nvfp4_mlp_only", "--kv_cache_qformat", "fp8",
            "--eval_windows", "0", "--quiet"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert "nvfp4" in out and "k_bmm_quantizer" in out
    assert "fused siblings (q/k/v, gate/up): 2 NVFP4 group(s)" in out  # gate/up of both layers
    assert "perplexity on" not in out


@pytest.mark.parametrize(
    "argv_fn, pattern",
    [
        (lambda f: ["ptq", "--model", f["root"] + "/missing", "--eval-windows", "0"], "no such file or directory"),
        (lambda f: _ptq(f, "--recipe", "general/ptq/no_such_recipe"), "no recipe"),
        (lambda f: _ptq(f, "--qformat", "bogus"), "unknown --qformat"),
        (lambda f: _ptq(f) + ["--calib-size", "0"], "--calib-size must be positive"),
        (lambda f: _ptq(f) + ["--calib-seq", "129"], "max_position_embeddings = 128"),
        (lambda f: _ptq(f) + ["--eval-seq", "128"], "max_position_embeddings = 128"),
        (lambda f: _ptq(f) + ["--dataset", "no_such_dataset"], "unknown dataset"),
        (lambda f: _ptq(f) + ["--load-calib-state", f["root"] + "/nope.safetensors"], "no such file"),
        (lambda f: _ptq(f) + ["--dtype", "int8"], "--dtype"),
    ],
)
def test_ptq_user_errors(files, capsys, argv_fn, pattern):
    rc, out, err = _run(argv_fn(files), capsys)
    assert rc == 2
    assert err.startswith("error: ") and pattern in err, err
    assert "Traceback" not in err
    assert "\n\n" not in err.strip()  # one paragraph


def test_unsupported_architecture(files, capsys, tmp_path):
    d = write_tiny_checkpoint(tmp_path / "foo", arch="FooForCausalLM")
    rc, out, err = _run(["ptq", "--model", str(d), "--eval-windows", "0"], capsys)
    assert rc == 2 and "FooForCausalLM" in err and "Traceback" not in err


def test_non_finite_weights(files, capsys, tmp_path):
    d = write_tiny_checkpoint(tmp_path / "nan", nan=True)
    argv = _ptq(files, "--eval-windows", "0")
    argv[argv.index("--model") + 1] = str(d)
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and "NaN or Inf" in err and "model.layers.1.mlp.up_proj.weight " in err
    assert "calibration (max)" not in out  # refused right after loading, before any forward


def test_existing_export_path_fails_before_calibration(files, capsys, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    rc, out, err = _run(_ptq(files, "--export-path", str(target)), capsys)
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert "calibration (max)" not in out and "load model" not in out  # refused before any work
    assert (target / "keep.txt").read_text() == "x"


def test_ctrl_c_exits_130_and_leaves_nothing(files, capsys, tmp_path, monkeypatch):
    import jaxquant.calibration as cal

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "quantize", interrupt)
    state = tmp_path / "s.safetensors"
    target = tmp_path / "export"
    rc, out, err = _run(_ptq(files, "--save-calib-state", str(state), "--export-path", str(target)), capsys)
    assert rc == 130 and "interrupted" in err
    assert not state.exists() and not target.exists()
    assert not list(tmp_path.iterdir())


def test_export_hf(files, capsys, tmp_path):
    pytest.importorskip("jaxquant.export.hf")
    target = tmp_path / "exported"
    rc, out, err = _run(_ptq(files, "--export-path", str(target), "--eval-windows", "0"), capsys)
    if rc == 2 and "no HF export" in err:
        pytest.skip("export not available in this build")
    assert rc == 0, err
    assert (target / "config.json").is_file() and (target / "hf_quant_config.json").is_file()
    hfq = json.loads((target / "hf_quant_config.json").read_text())
    assert hfq["quantization"]["quant_algo"] == "FP8"
    # rerun without --overwrite: refused up front; with it: replaced
    rc, out, err = _run(_ptq(files, "--export-path", str(target), "--eval-windows", "0"), capsys)
    assert rc == 2 and "not empty" in err
    rc, out, err = _run(_ptq(files, "--export-path", str(target), "--overwrite"), capsys)
    assert rc == 0, err
    ppl_q = [float(line.split()[1]) for line in out.splitlines() if line.startswith("quantized ")][0]
    # jaxquant eval on the exported ModelOpt checkpoint (real FP8 weights): the same quantized model
    try:
        from jaxquant.export import load_quantized  # noqa: F401
    except ImportError:
        return
    rc, out, err = _run(["eval", "--model", str(target), "--eval-dataset", files["eval"], "--eval-windows", "2",
                         "--eval-seq", "32", "--dtype", "float32"], capsys)
    assert rc == 0, err
    assert "quantized checkpoint" in out
    ppl_e = float(out.split("perplexity: ")[-1].split()[0])
    assert abs(ppl_e / ppl_q - 1) < 1e-3, (ppl_e, ppl_q)


def test_ptq_nvfp4_fp8_mha_exports_the_quantized_embedding_and_evaluates_the_same(files, capsys, tmp_path):
    """``--qformat nvfp4_fp8_mha`` (ModelOpt's preset quantizes the token table and lm_head as well): a MIXED_PRECISION
    export with ``model.embed_tokens`` W4A16_NVFP4, the same bytes with ``--layerwise`` (the table is exported with
    the embeddings' stage), which ``jaxquant check`` accepts. (Load-back: tests/export/test_export_nvfp4_fp8_mha.py.)"""
    pytest.importorskip("jaxquant.export.hf")
    outs, ppl = {}, {}
    for flag in ((), ("--layerwise", "--eval-windows", "0")):  # streamed: no perplexity in the run
        target = tmp_path / f"mha{len(flag)}"
        rc, out, err = _run(_ptq(files, "--export-path", str(target), "--qformat", "nvfp4_fp8_mha",
                                 "--kv_cache_qformat", "fp8", *flag), capsys)
        assert rc == 0, err
        ppl[flag] = [float(line.split()[1]) for line in out.splitlines() if line.startswith("quantized ")]
        outs[flag] = {p.name: p.read_bytes() for p in target.glob("*.safetensors")}
        q = json.loads((target / "hf_quant_config.json").read_text())["quantization"]
        assert q["quant_algo"] == "MIXED_PRECISION" and q["kv_cache_quant_algo"] == "FP8"
        assert q["quantized_layers"]["model.embed_tokens"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}
        assert q["quantized_layers"]["lm_head"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert outs[()] and outs[()] == outs[("--layerwise", "--eval-windows", "0")]
    assert ppl[()] and np.isfinite(ppl[()][0])
    rc, out, err = _run(["check", str(tmp_path / "mha0")], capsys)
    assert rc == 0 and "OK (quant_algo MIXED_PRECISION" in out, (out, err)


def test_eval_command(files, capsys):
    rc, out, err = _run(["eval", "--model", files["model"], "--eval-dataset", files["eval"], "--eval-windows", "2",
                         "--eval-seq", "32"], capsys)
    assert rc == 0, err
    assert "perplexity: " in out and np.isfinite(float(out.split("perplexity: ")[-1].split()[0]))
    rc, out, err = _run(["eval", "--model", files["model"], "--eval-dataset", files["eval"], "--eval-windows", "0"],
                        capsys)
    assert rc == 2


def test_python_m_jaxquant_help():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "jaxquant", "ptq", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0
    for flag in ("--pyt_ckpt_path", "--kv-cache-qformat", "--kv_cache_qformat", "--calib-size", "--export-format",
                 "--overwrite", "--pack", "--seed", "--dtype", "--recipe"):
        assert flag in p.stdout
    p = subprocess.run([sys.executable, "-m", "jaxquant"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "ptq" in p.stderr


@pytest.mark.slow
def test_default_demo_runs_with_no_arguments(capsys):
    """The README's main command (shortened: fewer samples and windows) on the embedded SmolLM2."""
    try:
        from jaxquant.cli_ptq import demo_gguf_path

        demo_gguf_path()
    except Exception as e:
        pytest.skip(str(e))
    try:
        from jaxquant.data import builtin_texts

        builtin_texts("lee_news")
    except Exception as e:
        pytest.skip(f"built-in text unavailable: {e}")
    rc, out, err = _run(["ptq", "--calib-size", "8", "--calib-seq", "64", "--eval-windows", "2", "--eval-seq", "64",
                         "--quiet"], capsys)
    assert rc == 0, err
    assert "SmolLM2-135M" in out and "embedded default" in out
    ppl = [float(line.split()[1]) for line in out.splitlines() if line.startswith(("original ", "quantized "))]
    assert len(ppl) == 2 and 1 < ppl[0] < 100 and ppl[1] < ppl[0] * 1.5


def test_cli_asks_xla_for_ieee_gpu_division(monkeypatch):
    """The command's own process gets IEEE float32 division on NVIDIA GPUs (speed only: the numerics
    are exact without it), merged into the user's XLA_FLAGS before JAX starts a backend."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/nowhere")
    for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        main(["ptq", "--help"])
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/nowhere --xla_backend_extra_options=-nvptx-prec-divf32=2"
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"  # JAX's allocator: 90 % of the device


def test_device_memory_default_keeps_the_users_choice():
    """``with_device_memory_default`` adds the 90 % fraction only when no allocator variable is set."""
    from jaxquant.numerics.xla_flags import with_device_memory_default

    assert with_device_memory_default({"A": "1"}) == {"A": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}
    for k, v in (("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5"), ("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),
                 ("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")):
        assert with_device_memory_default({k: v}) == {k: v}


def test_compile_ahead_while_loading_gives_the_same_export(files, capsys, tmp_path, monkeypatch):
    """cli_overlap: the tokenizer and the calibration's compilation on threads while the checkpoint loads
    (forced on for the CPU backend here) leave every exported byte as it was."""
    pytest.importorskip("jaxquant.export.hf")
    from jaxquant import cli_overlap
    from jaxquant.calibration import ahead

    outs = {}
    for on, lower_first in ((False, False), (True, False), (True, True)):  # the last: load after the lowering
        ahead.clear()
        monkeypatch.setattr(cli_overlap, "COMPILE_AHEAD_ON_CPU", on)
        monkeypatch.setattr(cli_overlap, "LOAD_AFTER_LOWERING", lower_first)
        target = tmp_path / f"ahead-{on}-{lower_first}"
        argv = _ptq(files, "--export-path", str(target), "--eval-windows", "0", "--recipe",
                    "general/ptq/nvfp4_default-kv_fp8", "--calib-seq", "16")
        rc, out, err = _run(argv, capsys)
        assert rc == 0, err
        assert ("calibration compiled while the model loaded" in out) == on
        outs[on, lower_first] = {p.name: p.read_bytes() for p in target.glob("*.safetensors")}
    assert outs[True, False] and outs[True, False] == outs[False, False] == outs[True, True]


def test_compile_cache_flag(tmp_path, capsys):
    """--compile-cache: off by default on CPU; a folder given is created and announced; 'none' is off."""
    import jax

    from jaxquant.cli_ptq import enable_compile_cache

    old = jax.config.jax_compilation_cache_dir
    try:
        assert enable_compile_cache(None) is None  # CPU backend: no default cache
        assert enable_compile_cache("none") is None
        d = tmp_path / "xla"
        assert enable_compile_cache(str(d)) == d and d.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(d)
        blocked = tmp_path / "file"
        blocked.write_text("x")
        assert enable_compile_cache(str(blocked / "sub")) is None
        assert "cannot create it" in capsys.readouterr().err
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


def test_layerwise_flag_gives_the_same_export(files, capsys, tmp_path):
    """``--layerwise`` (calibration layer by layer over all batches) writes the same bytes as the default order."""
    pytest.importorskip("jaxquant.export.hf")
    outs = {}
    ckpt = ("--layerwise-checkpoint", str(tmp_path / "ckpt"))
    for i, flag in enumerate(((), ("--layerwise",), ckpt, ckpt)):  # the last one resumes the finished checkpoint
        target = tmp_path / f"lw{i}"
        rc, out, err = _run(_ptq(files, "--export-path", str(target), "--eval-windows", "0", "--recipe",
                                 "general/ptq/nvfp4_default-kv_fp8", *flag), capsys)
        assert rc == 0, err
        assert ("resumed the layerwise calibration from" in out and "at its end" in out) == (i == 3), out
        outs[i] = {p.name: p.read_bytes() for p in target.glob("*.safetensors")}
    assert outs[0] and outs[0] == outs[1] == outs[2] == outs[3]


_PARKED = """
import json, sys
from pathlib import Path
import jax
from jaxquant import cli_ptq
from jaxquant.cli import main
argv, out = json.loads(sys.argv[1]), Path(sys.argv[2])
seen = {}
real_load = cli_ptq.load_model
def load_model(spec, dtype, *, device=None):
    seen["device"] = str(device)
    return real_load(spec, dtype, device=device)
cli_ptq.load_model = load_model
cli_ptq.parking_device = lambda: jax.devices()[1]  # stands in for host memory beside an accelerator
assert main(argv + ["--layerwise", "--no-stream", "--export-path", str(out / "parked")]) == 0
assert seen["device"] == str(jax.devices()[1]), seen
assert main(argv + ["--export-path", str(out / "plain")]) == 0
a = {p.name: p.read_bytes() for p in (out / "parked").glob("*.safetensors")}
b = {p.name: p.read_bytes() for p in (out / "plain").glob("*.safetensors")}
assert a and a == b
print("ok")
"""


def test_layerwise_keeps_the_parameters_parked_and_exports_the_same(files, tmp_path):
    """``--layerwise`` beside an accelerator loads the parameters into host memory (here: a second CPU device stands
    in for it) and streams layers to the device for calibration and perplexity: the perplexities printed and the
    export are the same as without it."""
    import json
    import os
    import subprocess
    import sys

    argv = [a for a in _ptq(files, "--recipe", "general/ptq/nvfp4_default-kv_fp8") if a != "--quiet"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _PARKED, json.dumps(argv), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout[-2000:], r.stderr[-3000:])
    tables = [t for t in r.stdout.split("perplexity on ")[1:]]
    assert len(tables) == 2 and "parameters stay in host memory" in r.stdout
    rows = [[ln for ln in t.splitlines() if ln.startswith(("original", "quantized"))] for t in tables]
    assert rows[0] == rows[1] and len(rows[0]) == 2, rows


def test_ptq_int8_smoothquant_export_and_state(files, capsys, tmp_path):
    """--qformat int8_smoothquant: SmoothQuant runs, the export carries pre_quant_scale, and the saved calibration
    state (pre_quant_scale included) reproduces the quantized perplexity without calibrating."""
    state, target = tmp_path / "state.safetensors", tmp_path / "exported"
    argv = _ptq(files, "--qformat", "int8_smoothquant", "--kv_cache_qformat", "none", "--save-calib-state",
                str(state), "--export-path", str(target))
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert "calibration (smoothquant)" in out
    hfq = json.loads((target / "hf_quant_config.json").read_text())
    assert hfq["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    from jaxquant.io.safetensors import CheckpointFiles

    assert "model.layers.0.self_attn.o_proj.pre_quant_scale" in set(CheckpointFiles.open(target).keys())
    ppl = [float(line.split()[1]) for line in out.splitlines() if line.startswith("quantized ")]
    rc, out2, err = _run(_ptq(files, "--qformat", "int8_smoothquant", "--kv_cache_qformat", "none",
                              "--load-calib-state", str(state)), capsys)
    assert rc == 0, err
    ppl2 = [float(line.split()[1]) for line in out2.splitlines() if line.startswith("quantized ")]
    assert ppl2 == ppl


@pytest.mark.parametrize("how, export", [
    (("--qformat", "nvfp4_w4a4_weight_local_hessian", "--kv_cache_qformat", "none"), True),
    (("--recipe", "general/ptq/nvfp4_act_headroom-kv_fp8_cast"), True),
    (("--qformat", "nvfp4_four_over_six", "--kv_cache_qformat", "none"), True),
    (("--qformat", "nvfp4_awq_clip", "--kv_cache_qformat", "none"), True),
    pytest.param(("--qformat", "nvfp4_awq_full", "--kv_cache_qformat", "none"), True, marks=pytest.mark.slow),
], ids=["local_hessian", "act_headroom", "four_over_six", "awq_clip", "awq_full"])
def test_ptq_accuracy_algorithms(files, capsys, tmp_path, how, export):
    """The algorithms of docs/ptq.md section 3c run from the CLI; the exports reload (NVFP4 with AWQ's pre_quant_scale
    as NVFP4_AWQ)."""
    from jaxquant.export import load_quantized

    argv = ["ptq", "--model", files["model"], "--dataset", files["calib"], "--calib-size", "8", "--calib-seq", "16",
            "--batch-size", "4", "--eval-windows", "0", "--quiet", *how, "--export-path", str(tmp_path / "out")]
    rc, out, err = _run(argv, capsys)
    if export:
        assert rc == 0, err
        assert load_quantized(tmp_path / "out") is not None
    else:
        assert rc == 2 and "pre_quant_scale" in err and "Traceback" not in err, err
