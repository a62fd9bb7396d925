"""Affine KV caches (hf_ptq ``--kv_cache_qformat fp8_affine`` / ``nvfp4_affine``): the same tiny Llama, amax and
bias exported by nvidia-modelopt (CPU) and by jaxquant are byte-identical (``k_bias`` / ``v_bias``, ``k_scale`` /
``v_scale``, ``kv_cache_quant_algo``); jaxquant's own calibration gives ModelOpt's bias and amax on the same
batches; FP8 affine fake quant is ``fp8_fq(x - bias) + bias``."""

import copy

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402


def hf_ptq_cfg(kv: str, qformat: str = "fp8") -> dict:
    """hf_ptq's composition: the model preset with the KV preset's entries appended."""
    import contextlib
    import io

    import modelopt.torch.quantization as mtq
    from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES

    with contextlib.redirect_stdout(io.StringIO()):
        return mtq.update_quant_cfg_with_kv_cache_quant(copy.deepcopy(QUANT_CFG_CHOICES[qformat]),
                                                        KV_QUANT_CFG_CHOICES[kv]["quant_cfg"])


@pytest.mark.parametrize("kv,algo", [("fp8_affine", "FP8"), ("nvfp4_affine", "NVFP4_AFFINE")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_affine_kv_byte_identical_to_modelopt(tmp_path, kv, algo, dtype):
    ref = R.compare_exports(tmp_path, hf_ptq_cfg(kv), dtype, n_enabled=32, with_biases=True)  # 28 linear + 4 KV
    tag = "F32" if dtype == "float32" else "BF16"
    assert ref["model.layers.1.self_attn.k_proj.k_bias"][:2] == (tag, (1, 2, 1, 16))
    assert ref["model.layers.1.self_attn.v_proj.v_bias"][:2] == (tag, (1, 2, 1, 16))
    assert ref["model.layers.1.self_attn.v_proj.v_scale"][:2] == ("F32", ())
    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert q["kv_cache_quant_algo"] == algo


@pytest.mark.parametrize("kv", ["fp8_affine", "nvfp4_affine"])
def test_affine_kv_calibration_equals_modelopt(tmp_path, kv):
    """jaxquant's preset (``preset_recipe("fp8", kv)``) calibrated on the same two batches as ModelOpt gives the same
    per-head, per-channel bias (a running mean of per-batch means) and the same amax of the centred keys / values,
    to float32 rounding (torch and XLA sum in different orders)."""
    import jax.numpy as jnp
    import torch

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.recipe import preset_recipe

    model = R.make_llama(tmp_path / "src", tie=False)
    amax = R.modelopt_quantize(model, hf_ptq_cfg(kv))
    biases = R.modelopt_biases(model)
    assert len(biases) == 4
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 12), generator=g).numpy() for _ in range(2)]
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    quantize(loaded.model, preset_recipe("fp8", kv), [(b.astype(np.int32), np.ones_like(b)) for b in batches],
             progress=False)
    for i in range(2):
        att = loaded.model.model.layers[i].self_attn
        for role in ("k_bmm_quantizer", "v_bmm_quantizer"):
            name = f"model.layers.{i}.self_attn.{role}"
            q = getattr(att, role)
            assert q.config.format == kv and float(q.bias_count.value) == 2.0
            ours = np.asarray(q.bias.value).transpose(0, 2, 1, 3)
            np.testing.assert_allclose(ours, biases[name], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(float(q.amax.value), float(amax[name]), rtol=1e-5, err_msg=name)


def test_fp8_affine_fake_quant_centres_the_tensor_and_nvfp4_affine_does_not():
    """FP8: ``fp8_fq(x - bias, amax) + bias`` (ModelOpt's ``ScaledE4M3Function`` on CPU); NVFP4: the bias only moves
    the calibrated amax (ModelOpt's dynamic-block kernel ignores it), so fake quant equals plain NVFP4."""
    import jax.numpy as jnp
    import torch
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3

    from jaxquant.numerics import nvfp4 as nvfp4_num
    from jaxquant.quantizer import TensorQuantizer
    from jaxquant.quantizer.config import QuantizerConfig

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 64, 2, 16)) * 3 + rng.standard_normal((1, 1, 2, 16)) * 5).astype(np.float32)
    bias_cfg = {-2: None, -4: None, "type": "static"}
    q = TensorQuantizer()
    q.configure(QuantizerConfig.from_dict({"num_bits": "e4m3", "bias": bias_cfg}), tensor_shape=(1, 1, 2, 16))
    q.set_mode("calibrate")
    q(jnp.asarray(x))
    bias, amax = np.asarray(q.bias.value), np.float32(q.amax.value)
    np.testing.assert_allclose(bias, x.mean(axis=(0, 1), keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(amax, np.abs(x - bias).max())
    q.set_mode("fake_quant")
    xt = torch.tensor(x).permute(0, 2, 1, 3)  # ModelOpt's [B, heads, S, D]
    want = scaled_e4m3(xt, torch.tensor(amax), torch.tensor(bias).permute(0, 2, 1, 3), 4, 3).permute(0, 2, 1, 3)
    np.testing.assert_array_equal(np.asarray(q(jnp.asarray(x))), want.numpy())

    n = TensorQuantizer()
    n.configure(QuantizerConfig.from_dict({"num_bits": "e2m1", "bias": bias_cfg, "block_sizes": {
        -1: 16, "type": "dynamic", "scale_bits": "e4m3"}}), tensor_shape=(1, 1, 2, 16))
    n.set_mode("calibrate")
    n(jnp.asarray(x))
    assert np.float32(n.amax.value) == amax
    n.set_mode("fake_quant")
    np.testing.assert_array_equal(np.asarray(n(jnp.asarray(x))),
                                  np.asarray(nvfp4_num.fake_quant_dynamic(jnp.asarray(x), amax, block_size=16)))


def test_affine_bias_options_jaxquant_does_not_implement_are_refused():
    from jaxquant.errors import UnsupportedError
    from jaxquant.quantizer import TensorQuantizer
    from jaxquant.quantizer.config import QuantizerConfig

    for bias, match in (({-2: None, "type": "dynamic"}, "type: dynamic"),
                        ({-2: None, "method": "max_min"}, "method: max_min")):
        with pytest.raises(UnsupportedError, match=match):
            TensorQuantizer().configure(QuantizerConfig.from_dict({"num_bits": "e4m3", "bias": bias}),
                                        tensor_shape=(1, 1, 2, 16))
    with pytest.raises(UnsupportedError, match="K/V bmm quantizers"):
        TensorQuantizer().configure(QuantizerConfig.from_dict({"num_bits": "e4m3", "bias": {-2: None}}),
                                    tensor_shape=None)


def test_fp8_affine_export_loads_back_and_validates(tmp_path):
    """Through the API (``preset_recipe("fp8", "fp8_affine")``): the export passes ``jaxquant check`` and
    load_quantized fake-quantizes K/V around the exported bias exactly as the calibrated model does."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.check import validate_checkpoint
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf, load_quantized
    from jaxquant.recipe import preset_recipe

    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, preset_recipe("fp8", "fp8_affine"), (ids, np.ones_like(ids)), progress=False)
    export_hf(loaded, tmp_path / "jq")
    assert validate_checkpoint(tmp_path / "jq").findings == []
    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 2, 16)).astype(np.float32))
    for i in range(2):
        for role in ("k_bmm_quantizer", "v_bmm_quantizer"):
            ours = getattr(loaded.model.model.layers[i].self_attn, role)
            theirs = getattr(back.model.model.layers[i].self_attn, role)
            assert theirs.config.format == "fp8_affine"
            np.testing.assert_array_equal(np.asarray(theirs.bias.value), np.asarray(ours.bias.value))
            np.testing.assert_array_equal(np.asarray(theirs(x)), np.asarray(ours(x)))


def test_affine_bias_travels_in_the_calibration_state(tmp_path):
    """``calibration_state`` holds the bias as ModelOpt's ``_bias_value`` ([1, heads, 1, head_dim]); saving and
    loading it into a freshly configured model restores the bias exactly (so a retried export keeps it)."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.calibration.state import calibration_state, load_calibration_state, save_calibration_state
    from jaxquant.converters import load_hf
    from jaxquant.io.safetensors import SafetensorsFile
    from jaxquant.recipe import apply_recipe, preset_recipe

    R.make_llama(tmp_path / "src", tie=False)
    recipe = preset_recipe("fp8", "nvfp4_affine")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, recipe, (ids, np.ones_like(ids)), progress=False)
    state = calibration_state(loaded.model)
    key = "model.layers.1.self_attn.v_bmm_quantizer._bias_value"
    assert state[key].shape == (1, 2, 1, 16)
    save_calibration_state(tmp_path / "state.safetensors", state)
    f = SafetensorsFile(tmp_path / "state.safetensors")
    back = {k: np.array(f.get(k)) for k in f.tensors}
    fresh = load_hf(tmp_path / "src", dtype=jnp.float32)
    apply_recipe(fresh.model, recipe, warn=False)
    load_calibration_state(fresh.model, back)
    want = loaded.model.model.layers[1].self_attn.v_bmm_quantizer.bias.value
    np.testing.assert_array_equal(np.asarray(fresh.model.model.layers[1].self_attn.v_bmm_quantizer.bias.value),
                                  np.asarray(want))


def test_check_rules_for_affine_kv_biases(tmp_path):
    """``jaxquant check`` reads k_bias / v_bias: one without its scale, and one of the wrong shape, are findings."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from jaxquant.calibration import quantize
    from jaxquant.check import validate_checkpoint
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.io.safetensors import SafetensorsFile
    from jaxquant.recipe import preset_recipe

    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, preset_recipe("fp8", "fp8_affine"), (ids, np.ones_like(ids)), progress=False)
    export_hf(loaded, tmp_path / "jq")
    f = SafetensorsFile(tmp_path / "jq" / "model.safetensors")
    t = {k: np.array(f.get(k)) for k in f.tensors}
    del f
    del t["model.layers.0.self_attn.k_proj.k_scale"]
    t["model.layers.1.self_attn.v_proj.v_bias"] = t["model.layers.1.self_attn.v_proj.v_bias"].reshape(1, 1, 2, 16)
    save_file(t, str(tmp_path / "jq" / "model.safetensors"), metadata={"format": "pt"})
    found = {(x.key, x.rule) for x in validate_checkpoint(tmp_path / "jq").findings}
    assert ("model.layers.0.self_attn.k_proj.k_bias", "kv-bias-unexpected") in found
    assert ("model.layers.1.self_attn.v_proj.v_bias", "scale-shape") in found
