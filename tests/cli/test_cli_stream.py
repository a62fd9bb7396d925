"""``jaxquant ptq --layerwise`` streamed (``cli_stream``, ``calibration/streaming.py``, ``export/streamed.py``): the
export is byte for byte the non-streamed one, and what cannot stream says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _tiny_cli import cli_files  # noqa: E402
from _tiny_families import write_tiny_family  # noqa: E402

from jaxquant.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return cli_files(tmp_path_factory.mktemp("stream"))


def _argv(model, calib, recipe, target, *extra):
    return ["ptq", "--model", str(model), "--dataset", calib, "--calib-size", "12", "--calib-seq", "24",
            "--batch-size", "4", "--eval-windows", "0", "--quiet", "--recipe", recipe, "--export-path", str(target),
            *extra]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("family,recipe", [
    ("llama", "general/ptq/fp8_qkvo-nvfp4_mlp"),
    ("llama", "general/ptq/nvfp4_default-kv_fp8"),
    ("qwen3_moe", "general/ptq/nvfp4_default-kv_fp8"),
    ("gemma4", "general/ptq/fp8_qkvo-nvfp4_mlp"),
])
def test_streamed_export_is_byte_identical(files, tmp_path, capsys, family, recipe):
    """Every file of the streamed export (safetensors, JSON, amax sidecar, tokenizer) equals the whole-model one."""
    model = write_tiny_family(family, tmp_path / family)
    assert main(_argv(model, files["calib"], recipe, tmp_path / "plain")) == 0
    assert main(_argv(model, files["calib"], recipe, tmp_path / "streamed", "--layerwise")) == 0
    out = capsys.readouterr().out
    assert "(streamed: each decoder layer is read when its stage runs" in out
    plain, streamed = _files(tmp_path / "plain"), _files(tmp_path / "streamed")
    assert "model.safetensors" in plain and "jaxquant_quant_state.json" in plain
    assert sorted(plain) == sorted(streamed)
    for name in plain:
        assert plain[name] == streamed[name], name


def test_streamed_export_shards_like_the_whole_model(files, tmp_path, monkeypatch):
    """Several shards (each file's header is planned before any layer is read): the same files and index."""
    from jaxquant.export import hf as export_hf_module

    real = export_hf_module.plan_export

    def small_shards(*a, **kw):
        kw["max_shard_size"] = 20_000
        return real(*a, **kw)

    monkeypatch.setattr(export_hf_module, "plan_export", small_shards)
    import jaxquant.export.streamed as streamed

    monkeypatch.setattr(streamed, "plan_export", small_shards)
    from jaxquant import cli_ptq

    monkeypatch.setattr(cli_ptq, "EARLY_EXPORT", False)  # the plain path goes through export_hf -> plan_export
    recipe = "general/ptq/nvfp4_default-kv_fp8"
    assert main(_argv(files["model"], files["calib"], recipe, tmp_path / "plain")) == 0
    assert main(_argv(files["model"], files["calib"], recipe, tmp_path / "streamed", "--layerwise")) == 0
    plain, streamed_files = _files(tmp_path / "plain"), _files(tmp_path / "streamed")
    assert "model.safetensors.index.json" in plain and len([n for n in plain if n.endswith(".safetensors")]) >= 2
    assert plain == streamed_files


def test_what_cannot_stream_says_so(files, tmp_path, capsys):
    """Perplexity is refused with a streamed run; a non-max algorithm and --no-stream fall back with a note."""
    recipe = "general/ptq/fp8_default-kv_fp8"
    assert main(_argv(files["model"], files["calib"], recipe, tmp_path / "a", "--layerwise", "--eval-windows",
                      "2")) != 0
    assert "perplexity needs the whole model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    from jaxquant.calibration.streaming import streaming_refusal

    assert "cannot stream yet" in streaming_refusal("mse")
    assert streaming_refusal("max") is None
    assert main(_argv(files["model"], files["calib"], recipe, tmp_path / "b", "--layerwise", "--no-stream")) == 0
    out = capsys.readouterr().out
    assert "streamed" not in out.split("model:", 1)[1].splitlines()[0]
    assert main(_argv(files["model"], files["calib"], recipe, tmp_path / "c", "--layerwise", "--export-format",
                      "orbax")) == 0
    assert "note: not streaming" in capsys.readouterr().out


@pytest.mark.slow  # two SmolLM2-135M runs per recipe (about a minute each on 2 shared cores)
@pytest.mark.parametrize("recipe", ["general/ptq/fp8_qkvo-nvfp4_mlp", "general/ptq/nvfp4_default-kv_fp8"])
def test_streamed_smollm2_export_is_byte_identical(files, tmp_path, recipe):
    """The real SmolLM2-135M (30 layers, tied embeddings, its own tokenizer): streamed == whole-model export."""
    from assets import smollm2_hf_dir

    model = smollm2_hf_dir()
    base = ["ptq", "--model", str(model), "--dataset", files["calib"], "--calib-size", "8", "--calib-seq", "32",
            "--batch-size", "4", "--eval-windows", "0", "--quiet", "--recipe", recipe]
    assert main(base + ["--export-path", str(tmp_path / "plain")]) == 0
    assert main(base + ["--export-path", str(tmp_path / "streamed"), "--layerwise"]) == 0
    plain, streamed = _files(tmp_path / "plain"), _files(tmp_path / "streamed")
    assert sorted(plain) == sorted(streamed)
    for name in plain:
        assert plain[name] == streamed[name], name


def test_streamed_failure_names_the_tensor_and_leaves_no_export(files, tmp_path, capsys):
    """A NaN in decoder layer 1, found when that layer is read (after layer 0 was exported): a NonFiniteError naming
    the tensor, and no partial export left behind."""
    from _tiny_cli import write_tiny_checkpoint

    bad = write_tiny_checkpoint(tmp_path / "nan", nan=True)
    target = tmp_path / "out"
    assert main(_argv(bad, files["calib"], "general/ptq/fp8_default-kv_fp8", target, "--layerwise")) != 0
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "NaN" in err
    assert not target.exists() and not list(tmp_path.glob(".out*"))


def test_streaming_plan_decides_without_loading_anything(tmp_path):
    """When a run streams, and the note it prints when layerwise cannot stream."""
    import argparse
    import types

    from jaxquant.cli_stream import streaming_plan

    def args(**kw):
        base = dict(layerwise=True, layerwise_checkpoint=None, no_stream=False, export_path=str(tmp_path / "o"),
                    export_format="hf", mesh=None, load_calib_state=None, model=str(tmp_path / "m"))
        return argparse.Namespace(**{**base, **kw})

    rec = types.SimpleNamespace(algorithm="max")
    assert streaming_plan(args(), rec) == (True, None)
    assert streaming_plan(args(layerwise=False), types.SimpleNamespace(
        algorithm={"method": "max", "layerwise": {"enable": True}})) == (True, None)  # the recipe asks for it
    assert streaming_plan(args(layerwise=False), rec) == (False, None)
    assert streaming_plan(args(no_stream=True), rec) == (False, None)
    for kw, why in ((dict(mesh="fsdp=2"), "--mesh"), (dict(load_calib_state="s.safetensors"), "--load-calib-state"),
                    (dict(model=None), "GGUF"), (dict(model="m.gguf"), "GGUF"),
                    (dict(layerwise_checkpoint="ck"), "--layerwise-checkpoint"),
                    (dict(export_format="orbax"), "exports orbax"), (dict(export_path=None), "exports nothing")):
        stream, note = streaming_plan(args(**kw), rec)
        assert not stream and why in note and note.startswith("note: not streaming"), (kw, note)
    stream, note = streaming_plan(args(), types.SimpleNamespace(algorithm="mse"))
    assert not stream and "algorithm mse cannot stream yet" in note
