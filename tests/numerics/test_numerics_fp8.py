"""FP8 E4M3 fake quant and export, bit-exact against ModelOpt's CPU functions."""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from _numerics_ref import (
    DTYPES,
    F32,
    JNP,
    TORCH,
    assert_bits_equal,
    mixed_data,
    mo_fp8_export,
    mo_fp8_fake_quant,
    round_to,
    to_quantized_weight,
    to_jax,
    to_torch,
)

from jaxquant.numerics import fp8


def test_spec_vector():
    # Spec §2.1 (CPU, ModelOpt 0.47.0).
    x = jnp.asarray([0, 0.01, -0.3, 1.0, 1.0625, 2.7, -3.5, 3.49], jnp.float32)
    expected = np.asarray([0.0, 0.009765625, -0.3125, 1.0, 1.0, 2.75, -3.5, 3.5], F32)
    assert_bits_equal(fp8.fake_quant(x, 3.5), expected, "spec 2.1 vector")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_per_tensor_1m(dtype):
    rng = np.random.default_rng(10)
    x = mixed_data(rng, (1024, 1024), dtype)
    xt = to_torch(x, dtype)
    # many amaxes: the real max, amaxes below it (saturation), and random ones of every magnitude
    amaxes = [np.abs(x).max(), np.abs(x).max() * F32(0.3)] + list(10.0 ** rng.uniform(-6, 4, 6))
    for amax in np.asarray(amaxes, F32):
        ours = fp8.fake_quant(to_jax(x, dtype), amax)
        assert ours.dtype == JNP[dtype]
        assert_bits_equal(ours, mo_fp8_fake_quant(xt, amax), f"fp8 fake quant {dtype} amax={amax}")


def test_fake_quant_many_amaxes():
    """The scale (reciprocal * 448) and its inverse, over 100k amaxes of every magnitude."""
    rng = np.random.default_rng(11)
    amax = (10.0 ** rng.uniform(-8, 6, (100_000, 1))).astype(F32)
    x = (rng.uniform(-1, 1, (100_000, 8)) * amax).astype(F32)
    ours = fp8.fake_quant(jnp.asarray(x), jnp.asarray(amax))
    assert_bits_equal(ours, mo_fp8_fake_quant(torch.from_numpy(x), torch.from_numpy(amax)), "per-row amax")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_every_value_of_dtype(dtype):
    """Every finite bf16/fp16 value (and 1M random float32 bit patterns), at several amaxes."""
    rng = np.random.default_rng(12)
    if dtype == "float32":
        x = rng.integers(0, 2**32, 1_000_000, dtype=np.uint32).view(F32)
    else:
        x = np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    x = x.astype(F32)
    x = x[np.isfinite(x)]
    for amax in [448.0, 1.0, 3.5, 2.0**-20, 1e30]:
        ours = fp8.fake_quant(to_jax(x, dtype), amax)
        assert_bits_equal(ours, mo_fp8_fake_quant(to_torch(x, dtype), amax), f"{dtype} amax={amax}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fake_quant_per_channel(dtype, axis):
    rng = np.random.default_rng(13)
    x = mixed_data(rng, (16, 32, 48), dtype)
    amax = np.abs(x).max(axis=tuple(a for a in range(3) if a != axis), keepdims=True)
    amax[(0,) * 3] = 0.0  # one zero channel
    ours = fp8.fake_quant(to_jax(x, dtype), amax)
    assert_bits_equal(ours, mo_fp8_fake_quant(to_torch(x, dtype), amax), f"per-channel axis {axis}")


def test_zero_and_tiny_amax():
    x = np.linspace(-2, 2, 33, dtype=F32)
    for amax in [0.0, 2.0**-24, 1e-26]:
        ours = fp8.fake_quant(jnp.asarray(x), amax)
        assert np.isfinite(np.asarray(ours)).all()
        assert_bits_equal(ours, mo_fp8_fake_quant(torch.from_numpy(x), amax), f"amax={amax}")
        assert_bits_equal(ours, fp8.fake_quant(jnp.asarray(x), 1.0), "amax <= 2^-24 acts as 1")
    # per channel: only the tiny channel is treated as amax 1
    xs = np.tile(np.linspace(-0.01, 0.01, 8, dtype=F32), (3, 1))
    amax = np.asarray([[0.01], [1e-26], [0.01]], F32)
    ours = fp8.fake_quant(jnp.asarray(xs), amax)
    assert_bits_equal(ours, mo_fp8_fake_quant(torch.from_numpy(xs), amax), "tiny channel")
    assert_bits_equal(ours[1], fp8.fake_quant(jnp.asarray(xs[1]), 1.0), "tiny channel acts as 1")


def test_nan_and_saturation():
    x = jnp.asarray([np.nan, np.inf, -np.inf, 10.0, -1000.0, 3.0], jnp.float32)
    ours = np.asarray(fp8.fake_quant(x, 4.0))
    ref = mo_fp8_fake_quant(torch.from_numpy(np.asarray(x)), 4.0).numpy()
    assert np.isnan(ours[0]) and np.isnan(ref[0])
    assert_bits_equal(ours[1:], ref[1:], "saturation")
    assert ours[1:5].tolist() == [4.0, -4.0, 4.0, -4.0]


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("dtype", DTYPES)
def test_export_per_tensor_1m(dtype):
    rng = np.random.default_rng(14)
    w = mixed_data(rng, (1024, 1024), dtype)
    wt = to_torch(w, dtype)
    for amax in [np.abs(w).max(), *(10.0 ** rng.uniform(-3, 3, 4))]:
        amax = F32(amax)
        q, scale = fp8.quantize(to_jax(w, dtype), amax)
        q_ref, scale_ref = mo_fp8_export(wt, torch.tensor(amax))
        assert q.dtype == jnp.float8_e4m3fn and scale.dtype == jnp.float32 and scale.shape == ()
        assert_bits_equal(scale, scale_ref, f"weight_scale amax={amax}")
        # Where |w / scale| >= 464 (amax below max|w|), torch >= 2.13 saturates the cast to +-448 and
        # older torch gives NaN; ours always saturates. Compare bits where the reference is finite.
        ref_f = q_ref.float().numpy()
        finite = np.isfinite(ref_f)
        assert_bits_equal(np.asarray(q)[finite], q_ref.view(torch.uint8).numpy()[finite].view(ml_dtypes.float8_e4m3fn), f"fp8 export {dtype} amax={amax}")
        sat = np.asarray(q.astype(jnp.float32))[~finite]
        assert (np.abs(sat) == 448).all()
        # dequantize like FP8QTensor.dequantize: q.to(dtype) * scale.to(dtype)
        deq_ref = q_ref.to(TORCH[dtype]) * scale_ref.to(TORCH[dtype])
        ours_deq = fp8.dequantize(q, scale, JNP[dtype])
        assert_bits_equal(np.asarray(ours_deq)[finite], np.asarray(to_jax(deq_ref.float().numpy(), dtype))[finite], "dequantize")


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_per_channel(dtype):
    rng = np.random.default_rng(15)
    w = mixed_data(rng, (256, 512), dtype)
    amax = np.abs(w).max(axis=1, keepdims=True)
    q, scale = fp8.quantize(to_jax(w, dtype), amax)
    q_ref, scale_ref = mo_fp8_export(to_torch(w, dtype), torch.from_numpy(amax), axis=0)
    assert scale.shape == (256, 1)
    assert_bits_equal(scale.reshape(-1), scale_ref, "per-channel weight_scale")
    assert_bits_equal(q, q_ref, "per-channel fp8 export")


def test_export_stacked_experts():
    """[E, out, in] with a per-expert amax: ModelOpt's 3-D path divides by a [E, 1, 1] float32 scale."""
    rng = np.random.default_rng(16)
    w = mixed_data(rng, (4, 64, 128), "bfloat16")
    amax = np.abs(w).max(axis=(1, 2), keepdims=True)
    q, scale = fp8.quantize(to_jax(w, "bfloat16"), amax)
    scale_ref = torch.from_numpy(amax.reshape(4, 1)) / 448.0
    q_ref = to_quantized_weight(to_torch(w, "bfloat16"), scale_ref, "fp8")
    assert_bits_equal(scale.reshape(4, 1), scale_ref, "per-expert scale")
    assert_bits_equal(q, q_ref, "stacked experts")


def test_fp8_export_through_modelopt_module():
    """The real module export (mtq.quantize + _export_quantized_weight) of bf16 / fp16 / fp32 Linears."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight

    for dtype in DTYPES:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False)).to(TORCH[dtype])
        w = m[0].weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mtq.quantize(m, mtq.FP8_DEFAULT_CFG, lambda mm: mm(torch.randn(4, 256, dtype=TORCH[dtype])))
            amax = m[0].weight_quantizer.amax.float()
            _export_quantized_weight(m[0], TORCH[dtype])
        q, scale = fp8.quantize(jnp.asarray(w.float().numpy()).astype(JNP[dtype]), amax.numpy())
        assert_bits_equal(scale, m[0].weight_scale, f"{dtype} weight_scale")
        assert_bits_equal(q, m[0].weight.detach(), f"{dtype} weight")


def test_export_zero_tensor_is_finite():
    """A zero amax exports as scale 1.0 with zero codes, like ModelOpt's export_amax sanitizer."""
    q, scale = fp8.quantize(jnp.zeros((4, 8), jnp.bfloat16), jnp.float32(0.0))
    q_ref, scale_ref = mo_fp8_export(torch.zeros(4, 8, dtype=torch.bfloat16), torch.tensor(0.0))
    assert float(scale) == 1.0
    assert_bits_equal(scale, scale_ref, "zero-amax scale")
    assert_bits_equal(q, q_ref, "zero-amax codes")
    assert (np.asarray(q.astype(jnp.float32)) == 0).all()
    # per channel, one zero channel
    w = np.ones((3, 4), F32)
    w[1] = 0
    amax = np.abs(w).max(axis=1, keepdims=True)
    q, scale = fp8.quantize(jnp.asarray(w), amax)
    q_ref, scale_ref = mo_fp8_export(torch.from_numpy(w), torch.from_numpy(amax), axis=0)
    assert_bits_equal(scale.reshape(-1), scale_ref, "zero channel scale")
    assert_bits_equal(q, q_ref, "zero channel codes")


def test_export_saturates_instead_of_nan():
    q, _ = fp8.quantize(jnp.asarray([1.0, 2.0, -100.0], jnp.float32), jnp.float32(1.0))
    assert np.asarray(q.astype(jnp.float32)).tolist() == [448.0, 448.0, -448.0]


def test_e4m3_cast_is_rne_like_torch():
    """The one dtype conversion we rely on: float32 -> float8_e4m3fn rounds to nearest even."""
    rng = np.random.default_rng(17)
    x = rng.integers(0, 2**32, 2_000_000, dtype=np.uint32).view(F32)
    x = x[np.isfinite(x) & (np.abs(x) <= 448)]
    ties = np.array([1 + 2**-4, 1 + 3 * 2**-4, 2**-10, 3 * 2**-10, 1 + 2**-4 + 2**-20, 2**-10 + 2**-30], F32)
    x = np.concatenate([x, ties, -ties])
    ours = jax.jit(lambda v: v.astype(jnp.float8_e4m3fn))(x)
    assert_bits_equal(ours, torch.from_numpy(x).to(torch.float8_e4m3fn), "f32->e4m3 cast")
    assert_bits_equal(ours, x.astype(ml_dtypes.float8_e4m3fn), "f32->e4m3 cast vs ml_dtypes")
    assert np.asarray(ours[-12:-6].astype(jnp.float32)).tolist() == [1.0, 1.25, 0.0, 2.0**-8, 1.125, 2.0**-9]


def test_scale_from_amax():
    amax = np.asarray([1.0, 3.5, 0.0, 1e-30, np.inf], F32)
    ours = np.asarray(fp8.scale_from_amax(amax))
    f32 = np.finfo(F32)
    assert ours.tolist() == [F32(1) / F32(448), F32(3.5) / F32(448), 1.0, F32(1e-30) / F32(448), f32.max / F32(448)]


def test_round_to_helper():
    assert round_to(np.asarray([1 + 2**-9], F32), "bfloat16")[0] == 1.0


def test_e4m3_arith_fallback_matches_cast():
    """The integer-only E4M3 rounding (for a backend without FP8 converts) equals the cast."""
    rng = np.random.default_rng(18)
    x = rng.integers(0, 2**32, 2_000_000, dtype=np.uint32).view(F32)
    x = x[np.isfinite(x) & (np.abs(x) <= 448)]
    specials = [2**-10, 3 * 2**-10, 2**-11, 1 + 2**-4, 1 + 3 * 2**-4, 448, 0.0, 2**-126, 1e-45]
    x = np.concatenate([x, rng.uniform(-448, 448, 500_000), rng.uniform(-0.01, 0.01, 500_000), specials, np.negative(specials)])
    x = x.astype(F32)
    ref = x.astype(ml_dtypes.float8_e4m3fn).astype(F32)
    assert_bits_equal(fp8.e4m3_round_arith(x), ref, "arithmetic e4m3 rounding")
    assert np.isnan(np.asarray(fp8.e4m3_round_arith(np.float32([np.nan])))).all()
