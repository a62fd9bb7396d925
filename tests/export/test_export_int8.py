"""INT8 weight-only (W8A16, ``--qformat int8_weight_only``): the same tiny Llama and amax exported by
nvidia-modelopt (CPU) and by jaxquant are byte-identical, and the export loads back."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
import numpy as np  # noqa: E402

INT8_WO = {"quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
    {"quantizer_name": "*input_quantizer", "enable": False},
    {"quantizer_name": "*lm_head*", "enable": False},
    {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False},
], "algorithm": "max"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_weight_only_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, INT8_WO, dtype, n_enabled=14)  # 7 linears x 2 layers
    assert ref["model.layers.0.self_attn.k_proj.weight"][:2] == ("I8", (32, 64))
    assert ref["model.layers.0.self_attn.k_proj.weight_scale"][:2] == ("F32", (32,))
    assert R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]["quant_algo"] == "W8A16"


def test_int8_weight_only_export_loads_back(tmp_path):
    """load_quantized dequantizes the INT8 codes with their per-channel scales: ``q * scale`` in float32."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf, load_quantized
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.recipe import preset_recipe

    src = tmp_path / "src"
    R.make_llama(src, tie=False, dtype="float32")
    loaded = load_hf(src, dtype=jnp.float32)
    quantize(loaded.model, preset_recipe("int8_weight_only", "none"), None, progress=False)
    export_hf(loaded, tmp_path / "jq")
    files = CheckpointFiles.open(tmp_path / "jq")
    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    q = np.asarray(files.get("model.layers.1.mlp.down_proj.weight"), np.float32)
    s = np.asarray(files.get("model.layers.1.mlp.down_proj.weight_scale"), np.float32)
    lin = back.model.model.layers[1].mlp.down_proj
    assert type(lin).__name__ == "QuantizedLinear" and lin.fmt == "int8_wo"
    np.testing.assert_array_equal(np.asarray(lin.dequantized_weight(), np.float32), q * s[:, None])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_w8a8_byte_identical_to_modelopt(tmp_path, dtype):
    """``--qformat int8``: per-channel INT8 weights + per-tensor INT8 activations (W8A8_SQ_PER_CHANNEL); fused
    siblings share one input_scale, keep their per-channel weight scales."""
    import copy

    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    ref = R.compare_exports(tmp_path, copy.deepcopy(QUANT_CFG_CHOICES["int8"]), dtype, n_enabled=28)
    assert ref["model.layers.0.self_attn.q_proj.input_scale"][:2] == ("F32", ())
    assert ref["model.layers.0.self_attn.q_proj.input_scale"] == ref["model.layers.0.self_attn.k_proj.input_scale"]
    assert ref["model.layers.0.self_attn.q_proj.weight_scale"] != ref["model.layers.0.self_attn.k_proj.weight_scale"]
    assert R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"


def test_validator_checks_the_tensors_of_tensorrt_llm_formats(tmp_path):
    """W8A8_SQ_PER_CHANNEL (and the other TensorRT-LLM formats) are validated tensor by tensor, not waved through:
    a missing input_scale and a weight_scale of the wrong shape are findings that name the tensor."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from jaxquant.calibration import quantize
    from jaxquant.check import validate_checkpoint
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.io.safetensors import SafetensorsFile
    from jaxquant.recipe import preset_recipe

    R.make_llama(tmp_path / "src", tie=False, dtype="float32")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, preset_recipe("int8", "none"), (ids, np.ones_like(ids)), progress=False)
    export_hf(loaded, tmp_path / "jq")
    assert [f for f in validate_checkpoint(tmp_path / "jq").findings if f.rule != "quant-algo-unsupported"] == []
    f = SafetensorsFile(tmp_path / "jq" / "model.safetensors")
    t = {k: np.array(f.get(k)) for k in f.tensors}
    del f
    del t["model.layers.0.mlp.up_proj.input_scale"]
    t["model.layers.1.self_attn.o_proj.weight_scale"] = t["model.layers.1.self_attn.o_proj.weight_scale"][:3]
    save_file(t, str(tmp_path / "jq" / "model.safetensors"), metadata={"format": "pt"})
    found = {(x.key, x.rule) for x in validate_checkpoint(tmp_path / "jq").findings}
    assert ("model.layers.0.mlp.up_proj.input_scale", "scale-missing") in found
    assert any(name == "model.layers.1.self_attn.o_proj.weight_scale" for name, _ in found)
