"""NVFP4 in blocks of 32: ``--qformat nvfp4_mlp_weight_only`` (W4A16_NVFP4, group_size 32) and ``--qformat
w4a8_nvfp4_fp8`` (W4A8_NVFP4_FP8: FP8 activations, ``weight_scale_2 = amax / 448``). The same tiny Llama and amax
exported by nvidia-modelopt 0.47 (CPU) and by jaxquant are byte-identical, both JSON files included."""

import copy

import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402


def _cfg(qformat):
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    return copy.deepcopy(QUANT_CFG_CHOICES[qformat])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nvfp4_mlp_weight_only_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, _cfg("nvfp4_mlp_weight_only"), dtype, n_enabled=6)  # 3 MLP linears x 2
    assert ref["model.layers.0.mlp.down_proj.weight_scale"][:2] == ("F8_E4M3", (64, 3))  # 96 inputs / 32
    hfq = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert hfq["quant_algo"] == "W4A16_NVFP4" and hfq["group_size"] == 32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w4a8_nvfp4_fp8_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, _cfg("w4a8_nvfp4_fp8"), dtype, n_enabled=28)  # 7 linears x 2 x (w, in)
    assert ref["model.layers.0.self_attn.q_proj.input_scale"][:2] == ("F32", ())
    assert R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]["quant_algo"] == "W4A8_NVFP4_FP8"


def test_w4a8_export_loads_back_with_fp8_activations(tmp_path):
    """load_quantized reads the declared W4A8_NVFP4_FP8: NVFP4 weights against ``weight_scale_2 = amax / 448``,
    activations fake-quantized to FP8 with the calibrated amax (``input_scale * 448``, exact from the sidecar)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf, load_quantized
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.numerics import nvfp4
    from jaxquant.recipe import preset_recipe

    R.make_llama(tmp_path / "src", tie=False, dtype="float32")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, preset_recipe("w4a8_nvfp4_fp8", "none"), (ids, np.ones_like(ids)), progress=False)
    src_lin = loaded.model.model.layers[0].mlp.up_proj
    export_hf(loaded, tmp_path / "jq")
    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    lin = back.model.model.layers[0].mlp.up_proj
    assert lin.fmt == "w4a8_nvfp4_fp8"
    assert lin.input_quantizer.config.format == "fp8"
    assert float(lin.input_quantizer.amax[...]) == float(src_lin.input_quantizer.amax[...])
    files = CheckpointFiles.open(tmp_path / "jq")
    name = "model.layers.0.mlp.up_proj"
    t = nvfp4.NVFP4Tensor(jnp.asarray(files.get(name + ".weight")), jnp.asarray(files.get(name + ".weight_scale")),
                          jnp.asarray(files.get(name + ".weight_scale_2")))
    np.testing.assert_array_equal(np.asarray(lin.dequantized_weight()), np.asarray(nvfp4.dequantize(t)))
    assert float(files.get(name + ".weight_scale_2")) == np.float32(float(src_lin.weight_quantizer.amax[...])) / np.float32(448)
