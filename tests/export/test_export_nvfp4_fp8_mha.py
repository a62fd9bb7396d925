"""``--qformat nvfp4_fp8_mha`` against nvidia-modelopt 0.47 on a tiny Llama (untied embeddings).

ModelOpt wrote the preset for diffusers: it has no ``default_disabled_quantizers``, so on a language model it also
quantizes lm_head (NVFP4 W4A4) and the token table (``QuantEmbedding.weight_quantizer``, NVFP4; the embedding's
input quantizer is hard-disabled, so the table exports as W4A16_NVFP4), and the checkpoint is MIXED_PRECISION.
Checked here: jaxquant's shipped preset, given ModelOpt's amax, exports every tensor and both JSON files byte for
byte like ModelOpt's ``export_hf_checkpoint`` (the JSON text too, so the order of ``quantized_layers`` and of the
``config_groups``); the export loads back with the fake-quantized table, equal to an independent numpy
dequantization of ModelOpt's tensors; ``jaxquant check`` accepts it and validates the table's scales; and what ModelOpt
writes for a tied model (the reason jaxquant refuses that case).
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
import _numpy_export_ref as N  # noqa: E402
from test_export_kv_affine import hf_ptq_cfg  # noqa: E402

# 14 linears x (weight, input) + lm_head (weight, input) + the token table + q / k / v bmm of 2 layers
N_ENABLED = 28 + 2 + 1 + 6


def _export_pair(tmp_path, dtype):
    """ModelOpt's hf_ptq composition (``nvfp4_fp8_mha`` + KV ``fp8``) exported by ModelOpt to ``mo`` and jaxquant's
    ``preset_recipe`` of the same names, with ModelOpt's amax, to ``jq``."""
    from jaxquant.recipe import preset_recipe

    src = tmp_path / "src"
    model = R.make_llama(src, tie=False, dtype=dtype)
    amax = R.modelopt_quantize(model, hf_ptq_cfg("fp8", "nvfp4_fp8_mha"))
    R.modelopt_export(model, tmp_path / "mo", dtype)
    R.export_recipe_like_modelopt(src, preset_recipe("nvfp4_fp8_mha", "fp8"), amax, dtype, tmp_path / "jq",
                                  n_enabled=N_ENABLED)
    return amax


def _text_without_producer(p):
    return "\n".join(line for line in p.read_text().splitlines() if '"name": ' not in line and '"version": ' not in line)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_byte_identical_to_modelopt(tmp_path, dtype):
    amax = _export_pair(tmp_path, dtype)
    assert "model.embed_tokens.weight_quantizer" in amax and "model.embed_tokens.input_quantizer" not in amax
    ref = R.assert_same_export(tmp_path / "mo", tmp_path / "jq")
    assert ref["model.embed_tokens.weight"][:2] == ("U8", (96, 32))
    assert ref["model.embed_tokens.weight_scale"][:2] == ("F8_E4M3", (96, 4))
    assert ref["model.embed_tokens.weight_scale_2"][:2] == ("F32", ())
    assert "model.embed_tokens.input_scale" not in ref and "lm_head.input_scale" in ref
    for f in ("hf_quant_config.json", "config.json"):  # the same text: key order included
        assert _text_without_producer(tmp_path / "jq" / f) == _text_without_producer(tmp_path / "mo" / f), f
    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and q["kv_cache_quant_algo"] == "FP8"
    assert list(q["quantized_layers"])[0] == "model.embed_tokens" and list(q["quantized_layers"])[-1] == "lm_head"
    assert q["quantized_layers"]["model.embed_tokens"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}
    groups = R.json_of(tmp_path / "jq" / "config.json")["quantization_config"]["config_groups"]
    assert groups["group_0"]["targets"] == ["model.embed_tokens"] and "input_activations" not in groups["group_0"]


def test_export_loads_back_with_the_quantized_table_and_passes_check(tmp_path):
    import jax.numpy as jnp

    from jaxquant.calibration.max import set_quant_mode
    from jaxquant.check import validate_checkpoint
    from jaxquant.converters import load_hf
    from jaxquant.export import load_quantized
    from jaxquant.recipe import apply_recipe, preset_recipe

    amax = _export_pair(tmp_path, "float32")
    t = R.tensors_of(tmp_path / "mo")
    raw = {k: np.frombuffer(t[f"model.embed_tokens.{k}"][2], dt).reshape(t[f"model.embed_tokens.{k}"][1])
           for k, dt in (("weight", np.uint8), ("weight_scale", np.uint8), ("weight_scale_2", np.float32))}
    import ml_dtypes

    want = N.nvfp4_dequantize(raw["weight"], raw["weight_scale"].view(ml_dtypes.float8_e4m3fn),
                              raw["weight_scale_2"])  # ModelOpt's bytes, dequantized in numpy

    # jaxquant's fake-quant lookup table with ModelOpt's amax is that table
    src = load_hf(tmp_path / "src", dtype=jnp.float32)
    apply_recipe(src.model, preset_recipe("nvfp4_fp8_mha", "fp8"), warn=False)
    emb = src.model.model.embed_tokens
    emb.weight_quantizer.amax.value = jnp.asarray(amax["model.embed_tokens.weight_quantizer"], jnp.float32).reshape(
        emb.weight_quantizer.amax.value.shape)
    set_quant_mode(src.model, "fake_quant")
    np.testing.assert_array_equal(np.asarray(emb.table()), want)

    for weights in ("packed", "dequantize"):
        loaded = load_quantized(tmp_path / "jq", dtype=jnp.float32, weights=weights)
        table = loaded.model.model.embed_tokens
        np.testing.assert_array_equal(np.asarray(table.weight[...]), want)
        assert not table.weight_quantizer.enabled  # already quantized values: nothing quantizes them again
        ids = jnp.asarray([[0, 5, 95, 5]], jnp.int32)
        np.testing.assert_array_equal(np.asarray(table(ids)), want[np.asarray(ids)])
    report = validate_checkpoint(tmp_path / "jq", deep=True)
    assert report.ok, report.format()


def test_check_validates_the_quantized_tables_scales(tmp_path):
    """``jaxquant check`` counts the packed token table with the quantized layers, so a broken table scale is
    found (here: ModelOpt's export with ``model.embed_tokens.weight_scale_2`` zeroed)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from jaxquant.check import validate_checkpoint

    _export_pair(tmp_path, "float32")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "mo", bad)
    (f,) = bad.glob("*.safetensors")
    t = load_file(str(f))
    t["model.embed_tokens.weight_scale_2"] = torch.zeros_like(t["model.embed_tokens.weight_scale_2"])
    save_file(t, str(f), metadata={"format": "pt"})
    assert validate_checkpoint(tmp_path / "mo").ok
    report = validate_checkpoint(bad)
    assert [x.key for x in report.findings] == ["model.embed_tokens.weight_scale_2"], report.format()


def test_modelopt_on_tied_embeddings_declares_a_table_it_does_not_quantize(tmp_path):
    """Why jaxquant refuses a quantized table on a tied model (tests/recipe/test_apply_embeddings.py): ModelOpt 0.47
    quantizes the tied lm_head with its own quantizer, writes it packed, and writes ``model.embed_tokens.weight``
    as plain floats while ``quantized_layers`` declares it W4A16_NVFP4. If this changes, revisit the refusal."""
    model = R.make_llama(tmp_path / "src", tie=True)
    R.modelopt_quantize(model, hf_ptq_cfg("fp8", "nvfp4_fp8_mha"))
    R.modelopt_export(model, tmp_path / "mo", "float32")
    t = R.tensors_of(tmp_path / "mo")
    assert t["model.embed_tokens.weight"][:2] == ("F32", (96, 64))
    assert "model.embed_tokens.weight_scale" not in t
    assert t["lm_head.weight"][:2] == ("U8", (96, 32))
    q = R.json_of(tmp_path / "mo" / "hf_quant_config.json")["quantization"]
    assert q["quantized_layers"]["model.embed_tokens"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}


def test_orbax_roundtrip_keeps_the_table_quantizer(tmp_path):
    """A calibrated nvfp4_fp8_mha model saved with orbax restores with its table quantizer: the same logits and the
    same export."""
    pytest.importorskip("orbax.checkpoint")
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf, restore_orbax, save_orbax
    from jaxquant.recipe import preset_recipe

    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    result = quantize(loaded.model, preset_recipe("nvfp4_fp8_mha", "fp8"), (ids, mask), batch_size=2, progress=False)
    ref = np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(mask)))
    save_orbax(loaded, tmp_path / "ck", resolution=result.resolution)
    ck = restore_orbax(tmp_path / "ck")
    assert ck.model.model.embed_tokens.weight_quantizer.format == "nvfp4"
    np.testing.assert_array_equal(np.asarray(ck.model(jnp.asarray(ids), jnp.asarray(mask))), ref)
    export_hf(loaded, tmp_path / "hf")
    export_hf(ck.loaded, tmp_path / "hf2", source_dir=tmp_path / "src")
    assert R.tensors_of(tmp_path / "hf2") == R.tensors_of(tmp_path / "hf")
