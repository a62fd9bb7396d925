"""MXFP8 (``--qformat mxfp8``): the same tiny Llama exported by nvidia-modelopt 0.47 (CPU) and by jaxquant is
byte-identical (E4M3 weights, U8 E8M0 scales, no input_scale, both JSON files); jaxquant's fake-quantized weight is
the checkpoint's dequantized weight; the export loads back with MXFP8 activations."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
import numpy as np  # noqa: E402

MX = {"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
CFG = {"quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*weight_quantizer", "cfg": MX},
    {"quantizer_name": "*input_quantizer", "cfg": MX},
    {"quantizer_name": "*lm_head*", "enable": False},
    {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False},
], "algorithm": "max"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp8_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, CFG, dtype, n_enabled=0)  # dynamic: nothing calibrated
    assert ref["model.layers.0.mlp.down_proj.weight"][:2] == ("F8_E4M3", (64, 96))
    assert ref["model.layers.0.mlp.down_proj.weight_scale"][:2] == ("U8", (64, 3))
    assert not any(k.endswith("input_scale") for k in ref)
    hfq = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert hfq["quant_algo"] == "MXFP8" and hfq["group_size"] == 32


def test_mxfp8_preset_fake_quant_is_the_export_and_loads_back(tmp_path):
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf, load_quantized
    from jaxquant.formats import get
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.recipe import preset_recipe

    src = tmp_path / "src"
    R.make_llama(src, tie=False, dtype="float32")
    loaded = load_hf(src, dtype=jnp.float32)
    res = quantize(loaded.model, preset_recipe("mxfp8", "none"), None, progress=False)
    lin = loaded.model.model.layers[1].mlp.down_proj
    fake = np.asarray(lin.weight_quantizer(lin.weight[...]), np.float32)
    export_hf(loaded, tmp_path / "jq", resolution=res)
    files = CheckpointFiles.open(tmp_path / "jq")
    name = "model.layers.1.mlp.down_proj"
    dq = np.asarray(get("mxfp8").dequantize({"weight": files.get(name + ".weight"),
                                            "weight_scale": files.get(name + ".weight_scale")}), np.float32)
    np.testing.assert_array_equal(fake.view(np.uint32), dq.view(np.uint32))
    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    blin = back.model.model.layers[1].mlp.down_proj
    assert blin.fmt == "mxfp8" and blin.input_quantizer.enabled and blin.input_quantizer.config.format == "mxfp8"
    np.testing.assert_array_equal(np.asarray(blin.dequantized_weight(), np.float32), dq)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 96)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(blin(x)), np.asarray(lin(x)))  # same weights, same MX activations


@pytest.mark.parametrize("qformat,n_enabled,algo", [("mxfp4_mlp_weight_only", 0, "mxfp4"),
                                                    ("mxfp4", 0, "mxfp4"),
                                                    ("w4a8_mxfp4_fp8", 14, "W4A8_MXFP4_FP8")])
def test_mxfp4_presets_byte_identical_to_modelopt(tmp_path, qformat, n_enabled, algo):
    """MXFP4 (packed E2M1 + E8M0 bytes; ModelOpt's lower-case ``quant_algo`` "mxfp4") and W4A8_MXFP4_FP8 (FP8
    input_scale), fp32; ModelOpt's presets name no algorithm, so max is given for the FP8 inputs."""
    import copy

    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    cfg = copy.deepcopy(QUANT_CFG_CHOICES[qformat])
    cfg["algorithm"] = "max"
    ref = R.compare_exports(tmp_path, cfg, "float32", n_enabled=n_enabled)
    assert ref["model.layers.0.mlp.down_proj.weight"][:2] == ("U8", (64, 48))
    assert ref["model.layers.0.mlp.down_proj.weight_scale"][:2] == ("U8", (64, 3))
    assert R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]["quant_algo"] == algo


def test_mxfp4_export_loads_back(tmp_path):
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf, load_quantized
    from jaxquant.recipe import preset_recipe

    R.make_llama(tmp_path / "src", tie=False, dtype="float32")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    quantize(loaded.model, preset_recipe("mxfp4", "none"), None, progress=False)
    lin = loaded.model.model.layers[0].self_attn.o_proj
    fake = np.asarray(lin.weight_quantizer(lin.weight[...]), np.float32)
    export_hf(loaded, tmp_path / "jq")
    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    blin = back.model.model.layers[0].self_attn.o_proj
    assert blin.fmt == "mxfp4" and blin.input_quantizer.config.format == "mxfp4"
    np.testing.assert_array_equal(np.asarray(blin.dequantized_weight(), np.float32).view(np.uint32), fake.view(np.uint32))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 64)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(blin(x)), np.asarray(lin(x)))
