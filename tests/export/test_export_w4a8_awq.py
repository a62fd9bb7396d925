"""W4A8_AWQ (INT4 block-128 weights then FP8 per tensor, static FP8 activations; hf_ptq ``--qformat w4a8_awq_beta``
with max calibration): the same tiny Llama (dims multiples of 128) and amax exported by nvidia-modelopt (CPU) and by
jaxquant are byte-identical; the sequential fake quant equals ModelOpt's ``SequentialQuantizer`` bit for bit; the
export loads back and passes ``jaxquant check``; the preset itself (awq_lite) picks ModelOpt's alphas and exports the
same bytes."""

import copy

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
from test_export_int4 import make_llama128  # noqa: E402


def w4a8_max_cfg():
    """hf_ptq's w4a8_awq_beta preset with its awq_lite algorithm replaced by max."""
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    cfg = copy.deepcopy(QUANT_CFG_CHOICES["w4a8_awq_beta"])
    assert cfg["algorithm"] == "awq_lite"
    cfg["algorithm"] = "max"
    return cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w4a8_awq_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, w4a8_max_cfg(), dtype, n_enabled=28, make=make_llama128)  # 14 w + 14 in
    assert ref["model.layers.0.mlp.down_proj.weight"][:2] == ("U8", (64, 256))
    assert ref["model.layers.0.mlp.down_proj.weight_scale"][:2] == ("F32", (128, 2))
    assert ref["model.layers.0.mlp.down_proj.weight_scale_2"][:2] == ("F32", ())
    assert ref["model.layers.0.mlp.down_proj.input_scale"][:2] == ("F32", ())
    # fused siblings share weight_scale_2 and input_scale, not their block scales
    qkv = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert len({ref[m + ".weight_scale_2"][2] for m in qkv}) == 1
    assert len({ref[m + ".input_scale"][2] for m in qkv}) == 1
    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == ("W4A8_AWQ", 128,
                                                                                             False, True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w4a8_fake_quant_equals_modelopt_sequential_quantizer(dtype):
    """INT4 blocks then FP8 per tensor on 1M elements (zero blocks, exact ties, tiny values, rows 5e4x apart):
    ModelOpt's ``SequentialQuantizer`` calibrated with max on CPU and jaxquant's ``int4_block128+fp8`` quantizer,
    calibrated the same way, agree bit for bit (amaxes and output)."""
    import jax.numpy as jnp
    import torch
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    from jaxquant.quantizer import TensorQuantizer as JQ
    from jaxquant.quantizer.sequential import as_quantizer_config
    from jaxquant.recipe.recipe import recipe_from_dict

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1024, 1024)) * rng.choice([1e-3, 1.0, 50.0], (1024, 1))).astype(np.float32)
    x[:4, :128] = 0.0  # zero blocks
    x[4, :128] = np.arange(128) / 14.0 - 4.0  # exact ties of x * 7 / amax
    x[5] = 0.0
    x[5, 3] = 1e-30  # a block whose amax is below ModelOpt's zero threshold
    tdt = getattr(torch, dtype)
    t = torch.tensor(x).to(tdt)
    seq = SequentialQuantizer(
        TensorQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 128, "type": "static"})),
        TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3))))
    seq.eval()
    for q in seq:
        q.enable_calib()
        q.disable_quant()
    seq(t)
    for q in seq:
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()
    want = seq(t).float().numpy()

    entry = w4a8_max_cfg()["quant_cfg"][1]
    cfg = as_quantizer_config(recipe_from_dict({"quant_cfg": [entry]}, check_supported=False).quant_cfg[0].cfg)
    assert cfg.format == "int4_block128+fp8" and cfg.unsupported_reason is None
    jq = JQ()
    jq.configure(cfg, tensor_shape=x.shape)
    xj = jnp.asarray(t.float().numpy()).astype(getattr(jnp, dtype))
    jq.calibrate_weight(xj)
    np.testing.assert_array_equal(np.asarray(jq.amax.value).reshape(-1), seq[0].amax.float().numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(jq.global_amax.value), seq[1].amax.float().numpy())
    jq.set_mode("fake_quant")
    got = np.asarray(jq(xj)).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def _quantized_export(tmp_path):
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf

    make_llama128(tmp_path / "src", "float32")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, w4a8_max_cfg(), (ids, np.ones_like(ids)), progress=False)
    export_hf(loaded, tmp_path / "jq")
    return loaded


def test_w4a8_export_loads_back_and_validates(tmp_path):
    """Through the API (the preset's quant_cfg with max): load_quantized gives ``fp8_fq(code * weight_scale,
    448 * weight_scale_2)`` (a numpy reference); for a linear without fused siblings that is the fake-quantized
    weight of the calibrated model bit for bit. ``jaxquant check`` finds nothing but "no vLLM loader", and finds a
    missing weight_scale_2 and a negative one."""
    import _numpy_export_ref as T
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from jaxquant.check import validate_checkpoint
    from jaxquant.export import load_quantized
    from jaxquant.io.safetensors import CheckpointFiles, SafetensorsFile

    loaded = _quantized_export(tmp_path)
    files = CheckpointFiles.open(tmp_path / "jq")
    m = "model.layers.1.mlp.down_proj"
    want = T.w4a8_dequantize(np.asarray(files.get(m + ".weight")), np.asarray(files.get(m + ".weight_scale")),
                             np.asarray(files.get(m + ".weight_scale_2")))
    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    lin = back.model.model.layers[1].mlp.down_proj
    assert type(lin).__name__ == "QuantizedLinear" and lin.fmt == "w4a8_awq"
    np.testing.assert_array_equal(np.asarray(lin.dequantized_weight(), np.float32), want)
    src = loaded.model.model.layers[1].mlp.down_proj
    fq = np.asarray(src.weight_quantizer(src.weight[...]), np.float32)
    np.testing.assert_array_equal(fq, want)

    assert [f for f in validate_checkpoint(tmp_path / "jq").findings if f.rule != "quant-algo-unsupported"] == []
    f = SafetensorsFile(tmp_path / "jq" / "model.safetensors")
    t = {k: np.array(f.get(k)) for k in f.tensors}
    del f
    del t["model.layers.0.self_attn.o_proj.weight_scale_2"]
    t["model.layers.1.mlp.up_proj.weight_scale_2"] = np.array(-1.0, np.float32)
    save_file(t, str(tmp_path / "jq" / "model.safetensors"), metadata={"format": "pt"})
    found = {(x.key, x.rule) for x in validate_checkpoint(tmp_path / "jq").findings}
    assert ("model.layers.0.self_attn.o_proj.weight_scale_2", "scale-missing") in found
    assert any(k == "model.layers.1.mlp.up_proj.weight_scale_2" for k, _ in found)


@pytest.mark.slow  # ~100 s on 2 cores: two awq_lite runs and two exports
def test_w4a8_awq_beta_preset_awq_lite_alphas_and_export_match_modelopt(tmp_path):
    """The preset as hf_ptq runs it (awq_lite): ModelOpt searches with the INT4 part of the sequential weight
    quantizer only (``convert_to_single_quantizer``), then max-calibrates INT4 + FP8 on the smoothed weight. jaxquant
    picks the same alpha for all 14 linears; from ModelOpt's calibrated state its export is byte-identical."""
    import test_export_smoothing as S

    from jaxquant.recipe import preset_recipe

    assert preset_recipe("w4a8_awq_beta", "none").algorithm == "awq_lite"
    model, src, cfg, batches = S._modelopt(tmp_path, "w4a8_awq_beta", debug=True)
    _, res = S._jaxquant(src, cfg, batches)
    want = {n: m.awq_lite.best_alpha for n, m in S._linears(model).items()}
    assert len(want) == 14 and res.stats.awq_alphas == want
    ref = S._export_both(tmp_path, model, src, cfg)
    assert ref["model.layers.0.self_attn.o_proj.pre_quant_scale"][:2] == ("F32", (128,))
    assert ref["model.layers.0.mlp.down_proj.weight_scale_2"][:2] == ("F32", ())


def test_w4a8_weights_without_fp8_inputs_are_refused(tmp_path):
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.errors import UnsupportedError
    from jaxquant.export import export_hf

    cfg = w4a8_max_cfg()
    cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if e["quantizer_name"] != "*input_quantizer"]
    make_llama128(tmp_path / "src", "float32")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    quantize(loaded.model, cfg, None, progress=False)
    with pytest.raises(UnsupportedError, match="W4A8_AWQ serves static per-tensor FP8 activations"):
        export_hf(loaded, tmp_path / "jq")
