"""E2M1 rounding, codes and packing against ModelOpt's ``NVFP4QTensor._cast_fp4`` and spec vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _numerics_ref import F32, NVFP4QTensor, assert_bits_equal, e2m1_round_magnitude_np

from jaxquant.numerics import e2m1

# Spec §2.3 (CPU, ModelOpt 0.47.0).
MAGS = [0, 0.24, 0.25, 0.26, 0.74, 0.75, 0.76, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6, 7]
MAG_CODES = [0, 0, 0, 1, 1, 2, 2, 2, 4, 4, 6, 6, 7, 7, 7]


def test_spec_code_vectors():
    codes = np.asarray(e2m1.to_codes(jnp.asarray(MAGS, jnp.float32)))
    assert codes.tolist() == MAG_CODES
    neg = np.asarray(e2m1.to_codes(jnp.asarray([-0.25, -0.75, -5.0, -7.0], jnp.float32)))
    assert neg.tolist() == [8, 10, 14, 15]


def test_boundaries_round_to_even():
    # §7 test_cuda_ext_fp4 boundary vector, at unit scale: ties go to the even code.
    x = jnp.asarray([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6], jnp.float32)
    expected = [0, 1, 1, 2, 2, 4, 4, 6]
    assert np.asarray(e2m1.round_magnitude(x)).tolist() == expected
    assert np.asarray(e2m1.from_codes(e2m1.to_codes(x))).tolist() == expected
    assert np.asarray(e2m1.from_codes(e2m1.to_codes(-x))).tolist() == [0.0] + [-v for v in expected[1:]]
    below = np.asarray(e2m1.round_magnitude(x.at[:-1].add(-0.1))).tolist()
    above = np.asarray(e2m1.round_magnitude(x.at[:-1].add(0.1))).tolist()
    assert below == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert above == [0.5, 1, 1.5, 2, 3, 4, 6, 6]


def test_negative_zero_codes():
    x = jnp.asarray([-0.0, 0.0, -1e-30, -0.25, -0.2500001, 1e-30], jnp.float32)
    assert np.asarray(e2m1.to_codes(x)).tolist() == [0, 0, 8, 8, 9, 0]
    vals = np.asarray(e2m1.from_codes(jnp.asarray([0, 8], jnp.uint8)))
    assert vals.view(np.uint32).tolist() == [0, 0]  # code 8 decodes to +0.0, like ModelOpt's table


def test_nan_inf_defined():
    x = jnp.asarray([np.nan, -np.nan, np.inf, -np.inf], jnp.float32)
    assert np.asarray(e2m1.to_codes(x)).tolist() == [7, 7, 7, 15]
    assert np.asarray(e2m1.round_magnitude(jnp.abs(x))).tolist() == [6, 6, 6, 6]
    # ModelOpt's export rounds NaN to code 7 too.
    mo = NVFP4QTensor._cast_fp4(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    assert mo.tolist() == [7, 7, 15]


def test_value_table():
    codes = jnp.arange(16, dtype=jnp.uint8)
    assert_bits_equal(e2m1.from_codes(codes), e2m1.VALUES, "from_codes")
    assert_bits_equal(e2m1.VALUES, NVFP4QTensor.get_e2m1_values("cpu").numpy(), "table vs ModelOpt")
    # every value is its own code (except -0 -> 0 for the +0 entry of code 8)
    assert np.asarray(e2m1.to_codes(jnp.asarray(e2m1.VALUES))).tolist() == list(range(8)) + [0] + list(range(9, 16))


def _dense_f32_samples(rng, n):
    """Values around every E2M1 boundary (exact ties, +-1 ulp) and random magnitudes up to 8."""
    bounds = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], F32)
    near = np.concatenate([bounds, np.nextafter(bounds, F32(0)), np.nextafter(bounds, F32(10))])
    rand = rng.uniform(0, 8, n).astype(F32)
    rand_bits = rng.integers(0, 0x41000000, n // 4, dtype=np.uint32).view(F32)  # all f32 in [0, 8)
    mags = np.concatenate([near, rand, rand_bits, [0.0]]).astype(F32)
    signs = np.where(rng.random(mags.shape) < 0.5, F32(-1), F32(1))
    return np.concatenate([mags * signs, -mags, mags]).astype(F32)


def test_codes_match_modelopt_cast_fp4_1m():
    x = _dense_f32_samples(np.random.default_rng(0), 1_000_000)
    ours = np.asarray(jax.jit(e2m1.to_codes)(x))
    ref = NVFP4QTensor._cast_fp4(torch.from_numpy(x.copy())).numpy()
    assert_bits_equal(ours, ref, "e2m1 codes vs NVFP4QTensor._cast_fp4")


def test_round_magnitude_matches_triton_formula_1m():
    a = np.abs(_dense_f32_samples(np.random.default_rng(1), 1_000_000))
    assert_bits_equal(jax.jit(e2m1.round_magnitude)(a), e2m1_round_magnitude_np(a), "round_magnitude")
    # and decoding the export codes gives the same magnitude
    assert_bits_equal(e2m1.from_codes(e2m1.to_codes(a)), e2m1_round_magnitude_np(a), "codes->values")


def test_pack_unpack_against_modelopt_layout():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, size=(3, 5, 64), dtype=np.uint8)
    packed = np.asarray(e2m1.pack(codes))
    t = torch.from_numpy(codes)
    ref = ((t[..., 1::2] << 4) | t[..., 0::2]).numpy()  # NVFP4QTensor.quantize packing
    assert_bits_equal(packed, ref, "pack")
    assert packed[0, 0, 0] == (codes[0, 0, 0] | (codes[0, 0, 1] << 4))
    assert_bits_equal(e2m1.unpack(packed), codes, "unpack")
    with pytest.raises(ValueError, match="even"):
        e2m1.pack(codes[..., :63])
