"""Export -> load back (load_quantized) -> same weights and logits as the in-memory fake-quant model."""

import numpy as np
import pytest

pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

import _export_modelopt_ref as R  # noqa: E402
from flax import nnx  # noqa: E402

from jaxquant.calibration import quantize  # noqa: E402
from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.export import export_hf  # noqa: E402
from jaxquant.export.load_quantized import QuantizedLinear, load_quantized  # noqa: E402
from jaxquant.models.layers import Linear  # noqa: E402


def _calibrated(tmp_path, recipe, dtype, tie=False):
    R.make_llama(tmp_path / "src", tie=tie, dtype="float32")
    loaded = load_hf(tmp_path / "src", dtype=getattr(jnp, dtype))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (4, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding
    quantize(loaded.model, recipe, (ids, mask), batch_size=2, progress=False)
    return loaded, jnp.asarray(ids), jnp.asarray(mask)


def _modules(model, cls):
    return {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, cls)}


# (recipe, dtype) -> logits must be bit-equal; FP8 weights differ by design in rare elements (ModelOpt's
# export divides by amax/448, its fake quant multiplies by 448/amax), so FP8 cases get a tolerance.
CASES = {
    "nvfp4_default-kv_fp8/float32": 0.0,
    "nvfp4_default-kv_fp8/bfloat16": 0.0,
    "nvfp4_weight_only-kv_fp8_cast/float32": 0.0,
    "fp8_qkvo-nvfp4_mlp/float32": 0.0,
    "fp8_default-kv_fp8/bfloat16": 0.0,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_logits(tmp_path, case):
    recipe, dtype = case.split("/")
    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/" + recipe, dtype)
    ref = np.asarray(loaded.model(ids, mask))
    export_hf(loaded, tmp_path / "out")
    for mode in ("packed", "dequantize"):
        back = load_quantized(tmp_path / "out", dtype=getattr(jnp, dtype), weights=mode)
        got = np.asarray(back.model(ids, mask))
        m = np.asarray(mask, bool)
        diff = float(np.abs(got - ref)[m].max())
        assert diff <= CASES[case], f"{mode}: max |logits diff| {diff}"
    packed = _modules(load_quantized(tmp_path / "out", dtype=getattr(jnp, dtype)).model, QuantizedLinear)
    assert packed, "quantized linears must stay packed"


def test_roundtrip_weights_bit_equal_nvfp4(tmp_path):
    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/nvfp4_default-kv_fp8", "float32")
    export_hf(loaded, tmp_path / "out")
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    orig, packed = _modules(loaded.model, Linear), _modules(back.model, QuantizedLinear)
    assert len(packed) == 14 and all(q.fmt == "nvfp4" for q in packed.values())
    for k, q in packed.items():
        o = orig[k]
        fq = np.asarray(o.weight_quantizer(o.weight[...]))
        np.testing.assert_array_equal(np.asarray(q.dequantized_weight()), fq, err_msg=k)
        assert q.weight[...].dtype == jnp.uint8 and q.weight_scale[...].dtype == jnp.float8_e4m3fn
        # input amax recovered from input_scale drives the same activation fake quant
        assert float(q.input_quantizer.amax.value) == pytest.approx(float(o.input_quantizer.amax.value), rel=1e-6)


def test_roundtrip_fp8_weights_within_one_step(tmp_path):
    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/fp8_default-kv_fp8", "float32")
    export_hf(loaded, tmp_path / "out")
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    orig, packed = _modules(loaded.model, Linear), _modules(back.model, QuantizedLinear)
    # fake quant multiplies the E4M3 codes by fl(1/fl(448/amax)), the checkpoint by fl(amax/448): the two
    # scales may differ in the last bit, the codes must not.
    for k, q in packed.items():
        o = orig[k]
        fq = np.asarray(o.weight_quantizer(o.weight[...]))
        dq = np.asarray(q.dequantized_weight())
        np.testing.assert_allclose(dq, fq, rtol=2e-7, atol=0, err_msg=k)


def test_kv_scales_reach_the_loaded_model(tmp_path):
    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/fp8_default-kv_fp8", "float32")
    export_hf(loaded, tmp_path / "out")
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    a0, b0 = loaded.model.model.layers[0].self_attn, back.model.model.layers[0].self_attn
    assert b0.k_bmm_quantizer.enabled and b0.k_bmm_quantizer.mode == "fake_quant"
    assert float(b0.k_bmm_quantizer.amax.value) == pytest.approx(float(a0.k_bmm_quantizer.amax.value), rel=1e-6)
    off = load_quantized(tmp_path / "out", dtype=jnp.float32, activations="off")
    assert not off.model.model.layers[0].self_attn.k_bmm_quantizer.enabled


def test_loader_does_not_need_safetensors_numpy_reader(tmp_path):
    """safetensors' own numpy reader cannot return F8 (safetensors#682); ours must not depend on it."""
    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/fp8_default-kv_fp8", "float32")
    export_hf(loaded, tmp_path / "out")
    st_np = pytest.importorskip("safetensors.numpy")
    with pytest.raises(AttributeError, match="float8_e4m3fn"):
        st_np.load_file(str(tmp_path / "out" / "model.safetensors"))
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    assert np.isfinite(np.asarray(back.model(ids, mask))).all()


def test_reference_loader_reads_our_export(tmp_path):
    """transformers (torch) loads the exported safetensors + config: names, shapes and dtypes are HF's."""
    torch = pytest.importorskip("torch")
    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/nvfp4_default-kv_fp8", "float32")
    export_hf(loaded, tmp_path / "out")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert sd["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert sd["model.layers.0.self_attn.k_proj.k_scale"].shape == ()


def test_scales_alone_reconstruct_nvfp4_exactly(tmp_path):
    """Without the jaxquant_quant_state.json sidecar (e.g. NVIDIA's checkpoints) the activation amax
    comes from the scales; NVFP4 fake quant only uses amax/2688, so the logits stay identical."""
    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/nvfp4_default-kv_fp8", "float32")
    ref = np.asarray(loaded.model(ids, mask))
    export_hf(loaded, tmp_path / "out")
    from jaxquant.export.hf import STATE_FILE
    from jaxquant.export.load_quantized import amax_from_scale

    assert (tmp_path / "out" / STATE_FILE).is_file()
    (tmp_path / "out" / STATE_FILE).unlink()
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    q = back.model.model.layers[0].mlp.up_proj.input_quantizer
    orig = loaded.model.model.layers[0].mlp.up_proj.input_quantizer
    assert np.float32(q.amax.value) / np.float32(2688) == np.float32(orig.amax.value) / np.float32(2688)
    got = np.asarray(back.model(ids, mask))
    # FP8 KV amax may come back one ulp off (448/amax then differs in the last bit): near-equal logits
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    for a in np.random.default_rng(0).uniform(1e-3, 1e3, 2000).astype(np.float32):
        for d in (448.0, 2688.0):
            s = a / np.float32(d)  # an exported scale
            assert np.float32(amax_from_scale(s, d) / np.float32(d)) == s


def test_reexport_of_loaded_quantized_is_refused(tmp_path):
    from jaxquant.errors import UnsupportedError

    loaded, ids, mask = _calibrated(tmp_path, "general/ptq/fp8_default-kv_fp8", "float32")
    export_hf(loaded, tmp_path / "out")
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    with pytest.raises(UnsupportedError, match="already packed"):
        export_hf(back, tmp_path / "again")
    assert not (tmp_path / "again").exists()
