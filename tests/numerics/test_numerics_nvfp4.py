"""NVFP4 fake quant (dynamic, static) and export, bit-exact against ModelOpt and the Triton formulas."""

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
    NVFP4QTensor,
    _blocks_np,
    assert_bits_equal,
    mixed_data,
    mo_nvfp4_dequant,
    mo_nvfp4_export,
    round_to,
    to_jax,
    to_torch,
    triton_dynamic_np,
    triton_static_np,
)

from jaxquant.numerics import e2m1, nvfp4


def _cast(y32: np.ndarray, dtype: str) -> np.ndarray:
    """The kernels' final ``.to(OUT_DTYPE)`` (round to nearest even)."""
    return np.asarray(y32, F32).astype({"float32": F32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype])


def _block_max(x: np.ndarray, bs: int = 16) -> np.ndarray:
    return np.abs(_blocks_np(x, bs)).max(axis=-1)


def _plus_zero(a) -> np.ndarray:
    """-0.0 -> +0.0 (float32), for comparisons where only the sign of zero may differ."""
    return np.asarray(a, F32) + F32(0.0)


# ============================================================================ dynamic fake quant
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_matches_triton_formula_1m(dtype):
    rng = np.random.default_rng(20)
    x = mixed_data(rng, (1024, 1024), dtype)
    amax = np.abs(x).max()
    for ga in [amax, amax * F32(0.01), amax * F32(30.0)]:  # calibrated, outliers beyond it, loose
        ours = nvfp4.fake_quant_dynamic(to_jax(x, dtype), F32(ga))
        assert ours.dtype == JNP[dtype] and ours.shape == x.shape
        assert_bits_equal(ours, _cast(triton_dynamic_np(x, ga), dtype), f"dynamic fq {dtype} ga={ga}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_equals_modelopt_export_round_trip(dtype):
    """On normal data the Triton formula equals NVFP4QTensor quantize -> dequantize (spec §2.4),
    bit for bit, zeros included: the kernel's ``0 - y`` and the export's code 8 both give +0.0."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((512, 2048)).astype(F32) * (10.0 ** rng.uniform(-1, 1, (512, 1))).astype(F32)
    x = round_to(x, dtype)
    ours = nvfp4.fake_quant_dynamic(to_jax(x, dtype), F32(np.abs(x).max()))
    qt, wsf, wsf2 = mo_nvfp4_export(to_torch(x, dtype))
    ref = mo_nvfp4_dequant(qt, wsf, wsf2, dtype)
    assert_bits_equal(ours, ref, "round trip")
    # and our own export round trip agrees the same way
    t = nvfp4.quantize(to_jax(x, dtype))
    assert_bits_equal(nvfp4.dequantize(t, JNP[dtype]), ref, "ours rt")


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_boundaries_at_unit_scale(block_size):
    """§7 test_cuda_ext_fp4 vectors. Global amax 2688 makes the global scale exactly 1, and every
    block holds a 6, so the block scale is exactly 1: ties round to even."""
    sign = np.where(np.random.default_rng(22).random(8) < 0.5, F32(-1), F32(1))
    grid = np.asarray([0, 0.5, 1, 1.5, 2, 3, 4, 6], F32)
    bounds = np.asarray([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6], F32)
    cases = [
        (grid, grid),
        (bounds, np.asarray([0, 1, 1, 2, 2, 4, 4, 6], F32)),
        (np.append(bounds[:-1] - F32(0.1), F32(6)), grid),
        (np.append(bounds[:-1] + F32(0.1), F32(6)), np.asarray([0.5, 1, 1.5, 2, 3, 4, 6, 6], F32)),
    ]
    for test_in, test_out in cases:
        x = np.tile(test_in * sign, block_size // 8)[None, :].astype(F32)
        want = np.tile(test_out * sign, block_size // 8)[None, :].astype(F32)
        ours = np.asarray(nvfp4.fake_quant_dynamic(jnp.asarray(x), F32(2688.0), block_size=block_size))
        assert_bits_equal(_plus_zero(ours), _plus_zero(want), f"dynamic, block {block_size}")
        static = nvfp4.fake_quant_static(jnp.asarray(x), _block_max(x, block_size), F32(6.0), block_size=block_size)
        assert_bits_equal(_plus_zero(static), _plus_zero(want), f"static, block {block_size}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_modelopt_kernel_test_vectors(dtype):
    """The same vectors as ModelOpt's Triton test (global amax = max|x| = 6, so the scale is 448 *
    (6/2688) ~ 0.99976, not exactly 1): bit-exact with the formula, close to the table like theirs."""
    sign = np.where(np.random.default_rng(23).random(8) < 0.5, F32(-1), F32(1))
    bounds = np.asarray([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6], F32)
    for test_in, test_out in [
        (np.asarray([0, 0.5, 1, 1.5, 2, 3, 4, 6], F32), np.asarray([0, 0.5, 1, 1.5, 2, 3, 4, 6], F32)),
        (np.append(bounds[:-1] - F32(0.1), F32(6)), np.asarray([0, 0.5, 1, 1.5, 2, 3, 4, 6], F32)),
        (np.append(bounds[:-1] + F32(0.1), F32(6)), np.asarray([0.5, 1, 1.5, 2, 3, 4, 6, 6], F32)),
    ]:
        x = round_to(np.tile(test_in * sign, 2)[None, :], dtype)
        ours = nvfp4.fake_quant_dynamic(to_jax(x, dtype), F32(np.abs(x).max()))
        assert_bits_equal(ours, _cast(triton_dynamic_np(x, np.abs(x).max()), dtype), "formula")
        np.testing.assert_allclose(np.asarray(ours.astype(jnp.float32))[0], np.tile(test_out * sign, 2), rtol=2e-3)


def test_dynamic_edge_cases():
    # all-zero tensor, zero global amax: zeros
    z = nvfp4.fake_quant_dynamic(jnp.zeros((4, 32), jnp.bfloat16), F32(0.0))
    assert (np.asarray(z.astype(jnp.float32)) == 0).all()
    # zero global amax with data: the 1e-12 fallback, as the kernel
    x = np.linspace(-1, 1, 64, dtype=F32).reshape(2, 32)
    assert_bits_equal(nvfp4.fake_quant_dynamic(jnp.asarray(x), F32(0.0)), triton_dynamic_np(x, 0.0), "ga=0")
    # block scale below half the smallest e4m3 subnormal -> 0 -> scale 1.0 (absolute) -> block ~ 0
    # (ModelOpt test_native_block_scale_underflows_to_zero: block_amax 6*2^-11, global scale 1)
    tiny = np.full((1, 16), 6 * 2.0**-11, F32)
    big = np.full((1, 16), 6.0, F32)
    x = np.concatenate([tiny, big], axis=1)
    ours = np.asarray(nvfp4.fake_quant_dynamic(jnp.asarray(x), F32(2688.0)))
    assert (ours[0, :16] == 0).all() and (ours[0, 16:] == 6).all()
    assert_bits_equal(ours, triton_dynamic_np(x, 2688.0), "underflow block")
    # effective scale below 1e-5 -> 1.0
    x = np.concatenate([np.full((1, 16), 3e-5, F32), np.full((1, 16), 1.0, F32)], axis=1)
    ours = np.asarray(nvfp4.fake_quant_dynamic(jnp.asarray(x), F32(1.0)))
    assert (ours[0, :16] == 0).all()
    assert_bits_equal(ours, triton_dynamic_np(x, 1.0), "1e-5 floor")
    # values that round to 0 give +0.0 whatever their sign (the kernel negates as 0 - y)
    x = np.asarray([[-1e-3, -0.0, 0.0, 1e-3, -1e-40, 1e-40] + [6.0] * 10], F32)
    ours = np.asarray(nvfp4.fake_quant_dynamic(jnp.asarray(x), F32(6.0)))
    assert ours[0, :6].view(np.uint32).tolist() == [0] * 6


@pytest.mark.parametrize("k", [8, 20, 40, 100])
def test_dynamic_last_dim_not_multiple_of_block(k):
    """Zero padding like the kernel's zero-filled tiles; the result has the input's shape."""
    rng = np.random.default_rng(24)
    x = mixed_data(rng, (6, k), "bfloat16")
    ours = nvfp4.fake_quant_dynamic(to_jax(x, "bfloat16"), F32(np.abs(x).max()))
    assert ours.shape == (6, k)
    assert_bits_equal(ours, _cast(triton_dynamic_np(x, np.abs(x).max()), "bfloat16"), f"K={k}")
    padded = np.concatenate([x, np.zeros((6, -k % 16), F32)], axis=1)
    full = nvfp4.fake_quant_dynamic(to_jax(padded, "bfloat16"), F32(np.abs(x).max()))
    assert_bits_equal(ours, full[:, :k], "pad then crop")


def test_dynamic_stacked_experts():
    rng = np.random.default_rng(25)
    x = mixed_data(rng, (4, 32, 64), "bfloat16")
    ga = np.abs(x).max(axis=(1, 2), keepdims=True) * np.asarray([1, 0.5, 2, 1], F32)[:, None, None]
    ours = nvfp4.fake_quant_dynamic(to_jax(x, "bfloat16"), ga)
    for e in range(4):
        assert_bits_equal(ours[e], nvfp4.fake_quant_dynamic(to_jax(x[e], "bfloat16"), ga[e, 0, 0]), f"expert {e}")
        assert_bits_equal(ours[e], _cast(triton_dynamic_np(x[e], ga[e, 0, 0]), "bfloat16"), f"expert {e} ref")


# ============================================================================ static fake quant
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_matches_modelopt_formula_1m(dtype):
    rng = np.random.default_rng(26)
    x = mixed_data(rng, (1024, 1024), dtype)
    bmax = _block_max(x)
    # calibrated amax = block max; MSE-style amax (shrunk or grown); zero blocks
    shrunk = (bmax * rng.uniform(0.3, 1.5, bmax.shape)).astype(F32)
    shrunk[rng.random(bmax.shape) < 0.01] = 0.0
    for block_amax in [bmax, shrunk]:
        for ga in [block_amax.max(), block_amax.max() * F32(0.5)]:
            ours = nvfp4.fake_quant_static(to_jax(x, dtype), block_amax, F32(ga))
            assert ours.dtype == JNP[dtype]
            assert_bits_equal(ours, _cast(triton_static_np(x, block_amax, ga), dtype), f"static {dtype} ga={ga}")


def test_static_zero_block_amax_zeroes_block():
    x = jnp.ones((2, 32), jnp.float32)
    ours = np.asarray(nvfp4.fake_quant_static(x, np.asarray([[0.0, 1.0], [1.0, 0.0]], F32), F32(1.0)))
    assert (ours[0, :16] == 0).all() and (ours[1, 16:] == 0).all() and (ours[0, 16:] == 1).all()
    # zero global amax: finite (ModelOpt test_nvfp4_tensor: zero static amax stays finite)
    ours = nvfp4.fake_quant_static(x, np.zeros((2, 2), F32), F32(0.0))
    assert np.isfinite(np.asarray(ours)).all()


def test_static_close_to_dynamic():
    """ModelOpt's test_static_vs_dynamic_fp4_kernels: static(block max, global max) ~ dynamic."""
    rng = np.random.default_rng(42)
    for bs in [16, 32, 64]:
        x = (rng.standard_normal((16, bs)) * 10).astype(F32)
        bmax = _block_max(x, bs)
        static = nvfp4.fake_quant_static(jnp.asarray(x), bmax, F32(bmax.max()), block_size=bs)
        dynamic = nvfp4.fake_quant_dynamic(jnp.asarray(x), F32(bmax.max()), block_size=bs)
        np.testing.assert_allclose(np.asarray(static), np.asarray(dynamic), rtol=1e-3, atol=1e-5)


def test_static_shapes():
    rng = np.random.default_rng(27)
    x = mixed_data(rng, (3, 8, 40), "float16")  # stacked experts, K not a multiple of 16
    bmax = _block_max(x)
    ga = bmax.max(axis=(1, 2), keepdims=True)
    ours = nvfp4.fake_quant_static(to_jax(x, "float16"), bmax, ga)
    assert ours.shape == x.shape
    for e in range(3):
        assert_bits_equal(ours[e], _cast(triton_static_np(x[e], bmax[e], ga[e, 0, 0]), "float16"), f"expert {e}")
    # a flat per-block amax (ModelOpt stores [num_blocks] for some quantizers) is accepted too
    flat = nvfp4.fake_quant_static(to_jax(x, "float16"), bmax.reshape(-1), ga)
    assert_bits_equal(flat, ours, "flat block amax")
    with pytest.raises(ValueError, match="does not match"):
        nvfp4.fake_quant_static(to_jax(x, "float16"), bmax[..., :2], ga)


# ============================================================================ export
def _spec_weight() -> np.ndarray:
    w = torch.stack([torch.linspace(-3.0, 3.5, 32), torch.linspace(-0.02, 0.05, 32) * torch.cos(torch.arange(32))])
    return w.float().numpy()


def test_spec_reference_vector():
    """Spec §2.5: NVFP4QTensor.quantize(w, 16) on CPU, ModelOpt 0.47.0."""
    t = nvfp4.quantize(jnp.asarray(_spec_weight()))
    assert_bits_equal(t.global_scale, np.float32("0.0013020833721384406"), "weight_scale_2")
    assert np.asarray(t.block_scale).view(np.uint8).tolist() == [[124, 126], [66, 76]]
    assert np.asarray(t.block_scale.astype(jnp.float32)).tolist() == [[384.0, 448.0], [2.5, 6.0]]
    assert np.asarray(t.packed).tolist() == [
        [255, 239, 238, 221, 205, 188, 154, 24, 33, 51, 68, 85, 101, 102, 118, 119],
        [223, 100, 164, 172, 128, 9, 84, 209, 156, 83, 195, 206, 100, 181, 239, 114],
    ]
    row0 = ("-3 -3 -3 -2 -2 -2 -1.5 -1.5 -1.5 -1 -1 -0.75 -0.5 -0.25 0 0.25 0.29166669 0.58333337 "
            "0.87500006 0.87500006 1.1666667 1.1666667 1.7500001 1.7500001 1.7500001 2.3333335 2.3333335 "
            "2.3333335 2.3333335 3.5000002 3.5000002 3.5000002").split()
    assert_bits_equal(nvfp4.dequantize(t)[0], np.asarray(row0, F32), "dequant row 0")


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_matches_modelopt_1m(dtype):
    rng = np.random.default_rng(28)
    w = mixed_data(rng, (1024, 1024), dtype)
    wt = to_torch(w, dtype)
    for ga in [None, F32(np.abs(w).max() * 3), F32(np.abs(w).max() * 0.25)]:
        t = nvfp4.quantize(to_jax(w, dtype), global_amax=ga)
        qt, wsf, wsf2 = mo_nvfp4_export(wt, global_amax=ga)
        assert t.packed.dtype == jnp.uint8 and t.packed.shape == (1024, 512)
        assert t.block_scale.dtype == jnp.float8_e4m3fn and t.block_scale.shape == (1024, 64)
        assert_bits_equal(t.global_scale, wsf2.reshape(()), f"weight_scale_2 ga={ga}")
        assert_bits_equal(t.block_scale, wsf, f"weight_scale {dtype} ga={ga}")
        assert_bits_equal(t.packed, qt._quantized_data, f"packed {dtype} ga={ga}")
        ref = mo_nvfp4_dequant(qt, wsf, wsf2, dtype)
        assert_bits_equal(nvfp4.dequantize(t, JNP[dtype]), ref, f"dequantize {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_export_matches_modelopt(dtype):
    rng = np.random.default_rng(29)
    w = mixed_data(rng, (512, 1024), dtype)
    wt = to_torch(w, dtype)
    bmax = _block_max(w)
    mse = (bmax * rng.uniform(0.5, 1.2, bmax.shape)).astype(F32)
    mse[rng.random(mse.shape) < 0.01] = 0.0
    for block_amax in [bmax, mse]:
        ga = F32(block_amax.max())
        t = nvfp4.quantize(to_jax(w, dtype), global_amax=ga, block_amax=block_amax)
        qt, wsf, wsf2 = mo_nvfp4_export(wt, global_amax=ga, block_amax=block_amax)
        assert_bits_equal(t.global_scale, wsf2.reshape(()), "static weight_scale_2")
        assert_bits_equal(t.block_scale, wsf, "static weight_scale")
        assert_bits_equal(t.packed, qt._quantized_data, "static packed")
        # global amax defaults to max(block_amax), as promote_static_block_weight_quantizers sets it
        t2 = nvfp4.quantize(to_jax(w, dtype), block_amax=block_amax)
        assert_bits_equal(t2.packed, t.packed, "default global amax")
    # static with block amax == block max gives the dynamic export's weight_scale bytes
    # (ModelOpt test_nvfp4_static_export_cpu asserts this on its own data; check it holds for theirs)
    qt_s, wsf_s, _ = mo_nvfp4_export(wt, global_amax=F32(bmax.max()), block_amax=bmax)
    qt_d, wsf_d, _ = NVFP4QTensor.quantize(wt, 16)
    same = torch.equal(wsf_s.view(torch.uint8), wsf_d.view(torch.uint8))
    ours_s = nvfp4.quantize(to_jax(w, dtype), block_amax=bmax).block_scale
    ours_d = nvfp4.quantize(to_jax(w, dtype)).block_scale
    assert same == bool((np.asarray(ours_s).view(np.uint8) == np.asarray(ours_d).view(np.uint8)).all())


def test_export_stacked_experts():
    rng = np.random.default_rng(30)
    w = mixed_data(rng, (4, 64, 128), "bfloat16")
    ga = np.abs(w).max(axis=(1, 2), keepdims=True).astype(F32)
    t = nvfp4.quantize(to_jax(w, "bfloat16"), global_amax=ga)
    assert t.global_scale.shape == (4, 1, 1) and t.block_scale.shape == (4, 64, 8) and t.packed.shape == (4, 64, 64)
    # ModelOpt's MoE export: weight_scale_2 per expert, viewed as [E, 1, 1]
    wt = to_torch(w, "bfloat16")
    wsf2 = torch.from_numpy(ga) / (6.0 * 448.0)
    wsf, _ = NVFP4QTensor.get_weights_scaling_factor(wt, 16, wsf2)
    qt, _, _ = NVFP4QTensor.quantize(wt, 16, wsf, wsf2)
    assert_bits_equal(t.global_scale, wsf2, "per-expert weight_scale_2")
    assert_bits_equal(t.block_scale, wsf, "per-expert weight_scale")
    assert_bits_equal(t.packed, qt._quantized_data, "per-expert packed")
    assert_bits_equal(nvfp4.dequantize(t, jnp.bfloat16), mo_nvfp4_dequant(qt, wsf, wsf2, "bfloat16"), "dequant")


def test_export_tiny_block_next_to_large():
    """Spec §2.5 edge vector: the export clamps the tiny block's scale up to 2^-9 (byte 1)."""
    w = np.concatenate([np.linspace(-1e-6, 1e-6, 16), np.linspace(-3.5, 3.5, 16)]).astype(F32)[None]
    t = nvfp4.quantize(jnp.asarray(w))
    qt, wsf, wsf2 = mo_nvfp4_export(torch.from_numpy(w))
    assert np.asarray(t.block_scale).view(np.uint8)[0, 0] == 1
    assert_bits_equal(t.block_scale, wsf, "scales")
    assert_bits_equal(t.packed, qt._quantized_data, "packed")
    deq = np.asarray(nvfp4.dequantize(t))[0, :16]
    np.testing.assert_allclose(deq[[0, 1, 2, 13, 14, 15]], [-1.2716e-6] * 3 + [1.2716e-6] * 3, rtol=1e-4)
    assert (deq[3:13] == 0).all()
    # the small negatives became code 8 ("-0"), the small positives code 0
    codes = np.asarray(e2m1.unpack(t.packed))[0, :16]
    assert codes.tolist() == [9, 9, 9, 8, 8, 8, 8, 8, 0, 0, 0, 0, 0, 1, 1, 1]


def test_export_all_zero_tensor():
    """ModelOpt writes NaN block scales (0/0) and codes 7 here; we write zero codes, finite scales."""
    t = nvfp4.quantize(jnp.zeros((4, 32), jnp.bfloat16))
    assert_bits_equal(t.global_scale, np.float32(6.0) / np.float32(2688.0), "weight_scale_2 (= 1/448)")
    assert (np.asarray(t.block_scale).view(np.uint8) == 0x38).all()  # e4m3 1.0
    assert (np.asarray(t.packed) == 0).all()
    assert (np.asarray(nvfp4.dequantize(t)) == 0).all()
    _, wsf, wsf2 = mo_nvfp4_export(torch.zeros(4, 32))
    assert float(wsf2) == 0.0 and torch.isnan(wsf.float()).all()  # the ModelOpt behaviour we deviate from
    # a zero block inside a non-zero tensor is the same in both: scale 1.0, codes 0
    w = np.zeros((1, 32), F32)
    w[0, 16:] = np.linspace(-1, 1, 16)
    t = nvfp4.quantize(jnp.asarray(w))
    qt, wsf, _ = mo_nvfp4_export(torch.from_numpy(w))
    assert_bits_equal(t.block_scale, wsf, "zero block scale")
    assert_bits_equal(t.packed, qt._quantized_data, "zero block codes")


@pytest.mark.parametrize("k", [20, 40, 100])
def test_export_last_dim_not_multiple_of_block(k):
    """ModelOpt pads the last axis with zeros before quantizing; so do we. dequantize(shape=) crops."""
    rng = np.random.default_rng(31)
    w = mixed_data(rng, (8, k), "bfloat16")
    t = nvfp4.quantize(to_jax(w, "bfloat16"))
    kp = -(-k // 16) * 16
    assert t.packed.shape == (8, kp // 2) and t.block_scale.shape == (8, kp // 16)
    qt, wsf, wsf2 = mo_nvfp4_export(to_torch(w, "bfloat16"))
    assert_bits_equal(t.block_scale, wsf, "padded scales")
    assert_bits_equal(t.packed, qt._quantized_data, "padded packed")
    deq = nvfp4.dequantize(t, jnp.bfloat16, shape=(8, k))
    assert deq.shape == (8, k)
    padded = nvfp4.dequantize(t, jnp.bfloat16)
    assert padded.shape == (8, kp) and (np.asarray(padded[:, k:].astype(jnp.float32)) == 0).all()
    assert_bits_equal(deq, padded[:, :k], "crop")
    with pytest.raises(ValueError, match="does not fit"):
        nvfp4.dequantize(t, shape=(8, kp + 1))


def test_global_scale_and_block_amax():
    amax = np.asarray([1.0, 3.5, 6.0, 2688.0, 1e-3], F32)
    assert_bits_equal(nvfp4.global_scale(amax), amax / F32(2688.0), "amax / 2688")
    x = np.arange(-20, 20, dtype=F32).reshape(2, 20)
    assert np.asarray(nvfp4.block_amax(jnp.asarray(x))).tolist() == [[20.0, 4.0], [15.0, 19.0]]
    assert nvfp4.block_amax(jnp.asarray(x), block_size=8).shape == (2, 3)
    with pytest.raises(ValueError, match="block_size"):
        nvfp4.block_amax(jnp.asarray(x), block_size=0)


def test_many_global_amaxes():
    """The global scale and the block-scale division, over 20k global amaxes of every magnitude."""
    rng = np.random.default_rng(32)
    ga = (10.0 ** rng.uniform(-6, 6, (20_000, 1, 1))).astype(F32)
    x = (rng.uniform(-1, 1, (20_000, 1, 32)) * ga * rng.uniform(0, 1, (20_000, 1, 1))).astype(F32)
    ours = nvfp4.fake_quant_dynamic(jnp.asarray(x), ga)
    assert_bits_equal(ours, triton_dynamic_np(x, ga), "per-row global amax")
    t = nvfp4.quantize(jnp.asarray(x), global_amax=ga)
    wsf2 = torch.from_numpy(ga) / (6.0 * 448.0)
    wsf, _ = NVFP4QTensor.get_weights_scaling_factor(torch.from_numpy(x), 16, wsf2)
    qt, _, _ = NVFP4QTensor.quantize(torch.from_numpy(x), 16, wsf, wsf2)
    assert_bits_equal(t.global_scale, wsf2, "wsf2")
    assert_bits_equal(t.block_scale, wsf, "wsf")
    assert_bits_equal(t.packed, qt._quantized_data, "packed")


def test_jit_vmap_and_abstract_lowering():
    """One jitted computation each, traceable with abstract shapes (no host sync, no callbacks)."""
    spec = jax.ShapeDtypeStruct((4, 64, 128), jnp.bfloat16)
    ga = jax.ShapeDtypeStruct((4, 1, 1), jnp.float32)
    bam = jax.ShapeDtypeStruct((4, 64, 8), jnp.float32)
    texts = [
        jax.jit(nvfp4.fake_quant_dynamic).lower(spec, ga).as_text(),
        jax.jit(nvfp4.fake_quant_static).lower(spec, bam, ga).as_text(),
        jax.jit(lambda x, g: nvfp4.quantize(x, global_amax=g)).lower(spec, ga).as_text(),
        jax.jit(lambda x, b: nvfp4.quantize(x, block_amax=b)).lower(spec, bam).as_text(),
    ]
    for text in texts:
        assert "callback" not in text and "custom_call" not in text
    x = jnp.ones((3, 2, 32), jnp.float32)
    out = jax.vmap(lambda a, g: nvfp4.fake_quant_dynamic(a, g))(x, jnp.ones((3,), jnp.float32))
    assert_bits_equal(out, nvfp4.fake_quant_dynamic(x, jnp.ones((3, 1, 1), jnp.float32)), "vmap")
