"""FP8 attention: the ``attention_qkv_fp8`` unit (FP8 query / key / value and FP8 softmax probabilities, the
attention part of ModelOpt's ``nvfp4_fp8_mha``) on top of the ``nvfp4`` preset.

ModelOpt quantizes the probabilities (``p_bmm_quantizer``) only inside its CUDA flash-attention kernel, and never
while calibrating (its calibration runs the plain attention), so the export is an NVFP4 checkpoint with an FP8 KV
cache and no trace of P. Checked here: that export byte-identical to nvidia-modelopt 0.47's from the same amax; P
pinned at amax 1.0 (the kernel's default: ModelOpt never calibrates it); calibration not touching P; jaxquant's
fake-quant attention against a hand-written numpy reference of the kernel's arithmetic with one key tile
(``exp(s - row max)`` quantized to E4M3 on the grid 1/448, the row sum of the unquantized values). The whole
``nvfp4_fp8_mha`` preset (which also quantizes lm_head and the token embedding) is test_export_nvfp4_fp8_mha.py.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
from test_export_kv_affine import hf_ptq_cfg  # noqa: E402


def _attention_fp8_cfg() -> dict:
    """hf_ptq's ``nvfp4`` + KV ``fp8`` composition with ModelOpt's ``attention_qkv_fp8`` unit appended."""
    import copy

    from modelopt.torch.quantization.config import NVFP4_FP8_MHA_CONFIG

    cfg = hf_ptq_cfg("fp8", "nvfp4")
    units = [e for e in NVFP4_FP8_MHA_CONFIG["quant_cfg"]
             if str(e.get("quantizer_name", "")).endswith(("bmm_quantizer", "softmax_quantizer"))
             and not str(e.get("quantizer_name", "")).startswith("transformer_blocks")]
    assert {e["quantizer_name"] for e in units} == {"*[qkv]_bmm_quantizer", "*softmax_quantizer", "*p_bmm_quantizer"}
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(units)
    return cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_attention_export_byte_identical_to_modelopt(tmp_path, dtype):
    # 28 linear quantizers and q / k / v bmm of 2 layers; P holds no calibrated amax on either side
    ref = R.compare_exports(tmp_path, _attention_fp8_cfg(), dtype, n_enabled=34)
    assert ref["model.layers.1.self_attn.k_proj.k_scale"][:2] == ("F32", ())
    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["kv_cache_quant_algo"] == "FP8"
    assert not any("p_bmm" in k or "q_scale" in k for k in ref)


def _e4m3_grid_qdq(x: np.ndarray, amax: float) -> np.ndarray:
    """E4M3 fake quant of float32 ``x`` >= 0 with scale ``amax / 448``: the nearest E4M3 value (ties to even),
    by enumerating the format's non-negative values (independent of jaxquant's numerics)."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    vals = np.array(sorted(vals), np.float64)
    scale = np.float64(np.float32(amax) / np.float32(448.0))
    y = np.clip(x.astype(np.float64) / scale, 0, 448)
    i = np.clip(np.searchsorted(vals, y), 1, len(vals) - 1)
    lo, hi = vals[i - 1], vals[i]
    pick_hi = (hi - y < y - lo) | ((hi - y == y - lo) & (np.arange(len(vals))[i] % 2 == 0))
    return (np.where(pick_hi, hi, lo) * scale).astype(np.float32)


def test_p_pinned_at_one_and_the_fake_quant_attention_matches_the_kernel_arithmetic(tmp_path):
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.models.layers import dot_product_attention

    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, _attention_fp8_cfg(), (ids, np.ones_like(ids)), batch_size=2, progress=False)
    attn = loaded.model.model.layers[0].self_attn
    p = attn.p_bmm_quantizer
    assert p.format == "fp8" and p.config.fixed_amax == 1.0 and float(p.amax.value) == 1.0  # never calibrated
    assert attn.q_bmm_quantizer.format == "fp8" and float(attn.q_bmm_quantizer.amax.value) > 0
    assert p.mode == "fake_quant"

    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 5, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 5, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 5, 2, 16)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))[None, None]
    got = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                           scaling=0.25, probs_quantizer=p))
    # numpy: scores, exp(s - row max) over the visible keys, E4M3 on the 1/448 grid, (pq @ v) / sum(p)
    kg = np.repeat(k, 2, axis=2)
    vg = np.repeat(v, 2, axis=2)
    s = np.einsum("bshd,bthd->bhst", q, kg).astype(np.float32) * np.float32(0.25)
    s = np.where(mask, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True)).astype(np.float32)
    want = np.einsum("bhst,bthd->bshd", _e4m3_grid_qdq(e, 1.0), vg) / np.moveaxis(e.sum(-1), 1, 2)[..., None]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    plain = np.einsum("bhst,bthd->bshd", e / e.sum(-1, keepdims=True), vg)
    assert np.abs(got - plain).max() > 1e-3  # the quantization is really applied
