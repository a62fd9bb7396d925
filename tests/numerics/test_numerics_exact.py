"""The XLA-proof building blocks: exact division and rounding to narrow floats (no convert pairs)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from _numerics_ref import F32, assert_bits_equal

from jaxquant.numerics._exact import decode_e4m3, decode_f16, div, round_to_dtype, round_to_e4m3


def test_div_is_ieee_for_every_divisor_shape():
    """XLA rewrites a / const, a / broadcast(b) (CPU: reciprocal multiply) and nested quotients."""
    rng = np.random.default_rng(50)
    a = rng.uniform(-10, 10, (1000, 100)).astype(F32)
    rows = rng.uniform(0.1, 10, (1000, 1)).astype(F32)
    s = F32(3.7)
    assert_bits_equal(jax.jit(lambda a, s: div(a, s))(a, s), a / s, "scalar divisor")
    assert_bits_equal(jax.jit(lambda a, b: div(a, b))(a, rows), a / rows, "per-row divisor")
    assert_bits_equal(jax.jit(lambda a: div(a, 448.0))(a), a / F32(448), "constant divisor")
    assert_bits_equal(jax.jit(lambda b: div(1.0, b))(rows), F32(1) / rows, "constant dividend")
    assert_bits_equal(jax.jit(lambda a, b: div(div(a, b), 3.0))(a, rows), (a / rows) / F32(3), "(a/b)/c")
    assert_bits_equal(jax.jit(lambda a, b: div(a, div(b, 3.0)))(a, rows), a / (rows / F32(3)), "a/(b/c)")
    nan = jax.jit(lambda a, b: div(a, b))(np.float32([np.nan, 1, 0]), np.float32([1, np.nan, 0]))
    assert np.isnan(np.asarray(nan)).all()


def test_decode_e4m3_all_codes():
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    ref = codes.astype(F32)
    ours = np.asarray(decode_e4m3(jnp.asarray(codes)))
    finite = np.isfinite(ref)
    assert_bits_equal(ours[finite], ref[finite], "e4m3 decode")
    assert np.isnan(ours[~finite]).all() and (~finite).sum() == 2


def test_decode_f16_all_codes():
    h = np.arange(2**16, dtype=np.uint16).view(np.float16)
    ref = h.astype(F32)
    ours = np.asarray(decode_f16(jnp.asarray(h)))
    finite = ~np.isnan(ref)
    assert_bits_equal(ours[finite], ref[finite], "f16 decode")
    assert np.isnan(ours[~finite]).all()


def test_round_to_narrow_floats():
    rng = np.random.default_rng(51)
    x = rng.integers(0, 2**32, 1_000_000, dtype=np.uint32).view(F32)
    x = x[np.isfinite(x)]
    small = x[np.abs(x) <= 448]
    assert_bits_equal(round_to_e4m3(small), small.astype(ml_dtypes.float8_e4m3fn).astype(F32), "e4m3")
    assert_bits_equal(round_to_dtype(x, jnp.bfloat16), x.astype(ml_dtypes.bfloat16).astype(F32), "bf16")
    in_f16 = x[np.abs(x) < 65504]
    assert_bits_equal(round_to_dtype(in_f16, jnp.float16), in_f16.astype(np.float16).astype(F32), "f16")
    assert_bits_equal(round_to_dtype(x, jnp.float32), x, "f32")


def test_to_e4m3_bits():
    """E4M3 encoding (the cast and the integer fallback) equals the RNE cast bit for bit (subnormal ties, -0.0)."""
    from jaxquant.numerics._exact import to_e4m3, to_e4m3_arith

    rng = np.random.default_rng(52)
    x = rng.integers(0, 2**32, 2_000_000, dtype=np.uint32).view(F32)
    x = x[np.isfinite(x) & (np.abs(x) <= 448)]
    q = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(F32)
    q = q[np.isfinite(q)]
    grid = np.unique(q)
    mids = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(F32)  # exact midpoints of the grid
    near = np.concatenate([mids, np.nextafter(mids, F32(-np.inf)), np.nextafter(mids, F32(np.inf))])
    x = np.concatenate([x, q, near, [-0.0]]).astype(F32)
    for fn in (to_e4m3, to_e4m3_arith):
        ours = fn(x)
        assert ours.dtype == jnp.float8_e4m3fn
        assert_bits_equal(ours, x.astype(ml_dtypes.float8_e4m3fn), fn.__name__)
        assert np.isnan(np.asarray(fn(np.float32([np.nan])).astype(jnp.float32))).all()
