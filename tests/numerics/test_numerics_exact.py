"""The XLA-proof building blocks: exact division and rounding to narrow floats (no convert pairs)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from _numerics_ref import F32, assert_bits_equal

import pytest

from jaxquant.numerics._exact import (
    IEEE_GPU_DIVISION_FLAG,
    _floor_div_small,
    decode_e4m3,
    decode_f16,
    div,
    round_quotient,
    round_to_dtype,
    round_to_e4m3,
    with_ieee_gpu_division,
)


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


def _ieee_quotients(n: int, seed: int):
    """Random float32 pairs over every bit pattern (subnormals, inf, NaN, zeros) and over a realistic
    range, with numpy's IEEE quotient (numpy does not flush subnormals)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 2**32, (2, n), dtype=np.uint64).astype(np.uint32).view(F32)
    real = (rng.standard_normal((2, n)) * np.exp(rng.uniform(-25, 25, (2, n)))).astype(F32)
    a, b = np.concatenate([raw, real], axis=1)
    tiny = np.float32(2.0**-149)
    special_a = np.array([3 * tiny, tiny, 5 * tiny, 2.0**-126, 2.0**127, 3.0, 0.0, -0.0, np.inf, np.inf, 1.0,
                          np.float32(3.4028235e38), 1.0, 2.0**-126], F32)
    special_b = np.array([2.0, 2.0, 2.0, 2.0**24, 2.0**-1, 3.0, 0.0, 5.0, np.inf, -2.0, -0.0,
                          np.float32(0.99999994), np.float32(3.4028235e38), 2.0**25], F32)
    a, b = np.concatenate([a, special_a]), np.concatenate([b, special_b])
    with np.errstate(all="ignore"):
        return a, b, a / b


@pytest.mark.parametrize("ulps", [0, 1, -1, 2, -2, 7, -7])
def test_round_quotient_is_ieee_from_a_guess_off_by_ulps(ulps):
    """Any guess within 7 ulp (hardware division is within 2) becomes the IEEE quotient, bit for bit,
    including subnormal results with their ties (3 * 2^-149 / 2 -> 2 * 2^-149), overflow and specials."""
    a, b, want = _ieee_quotients(300_000, seed=51 + ulps)
    finite = np.isfinite(want)
    step = np.where(np.signbit(want), -1, 1) * ulps
    guess_bits = want.view(np.uint32).astype(np.int64) + np.where(finite, step, 0)
    guess = np.clip(guess_bits, 0, 2**32 - 1).astype(np.uint32).view(F32)
    guess = np.where(finite & ~np.isfinite(guess), want, guess)  # stepped past the largest float
    got = np.asarray(jax.jit(round_quotient)(a, b, guess))
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert_bits_equal(got[~nan], want[~nan], f"round_quotient, guess {ulps:+d} ulp")


def test_floor_div_small_is_exact_next_to_multiples():
    """The correction step's integer division, where its float estimate is off by one: numerators
    one either side of a multiple of a divisor with 25-27 significant bits (float32 keeps 24)."""
    rng = np.random.default_rng(52)
    den = rng.integers(2**24, 2**27, 200_000).astype(np.int64)
    k = rng.integers(-16, 17, den.size)
    num = np.clip(k * den + rng.integers(-2, 3, den.size), -(2**31), 2**31 - 1)
    got_k, got_tie = jax.jit(_floor_div_small)(num.astype(np.int32), den.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(got_k), np.floor_divide(num, den))
    np.testing.assert_array_equal(np.asarray(got_tie), num % den == 0)


def test_round_quotient_tolerates_flushed_and_overflowed_guesses():
    tiny = np.float32(2.0**-149)
    a = np.array([3 * tiny, 7 * tiny, np.float32(3.4028235e38)], F32)
    b = np.array([2.0, 2.0, np.float32(0.99999997)], F32)
    guess = np.array([0.0, 0.0, np.inf], F32)  # what a flushing (FTZ) or sloppy division returns
    with np.errstate(all="ignore"):
        want = a / b
    assert_bits_equal(np.asarray(round_quotient(a, b, guess)), want, "flushed / overflowed guess")


def _lowered_div(platform: str) -> str:
    a = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    return jax.jit(lambda x, y: div(x, y)).trace(a, a).lower(lowering_platforms=(platform,)).as_text()


def test_div_rounds_exactly_where_the_hardware_does_not(monkeypatch):
    """TPUs and CUDA GPUs without the IEEE-division flag get the integer rounding (clz is its
    fingerprint); the CPU, and a CUDA GPU under the flag, divide in hardware alone."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert "count_leading_zeros" not in _lowered_div("cpu")
    assert "count_leading_zeros" in _lowered_div("cuda")
    assert "count_leading_zeros" in _lowered_div("tpu")
    monkeypatch.setenv("XLA_FLAGS", with_ieee_gpu_division("--xla_force_host_platform_device_count=1"))
    assert "count_leading_zeros" not in _lowered_div("cuda")
    assert "count_leading_zeros" in _lowered_div("tpu")


def test_with_ieee_gpu_division_merges_flags():
    flag = IEEE_GPU_DIVISION_FLAG
    assert with_ieee_gpu_division("") == flag
    assert with_ieee_gpu_division("--xla_dump_to=/tmp/x") == f"--xla_dump_to=/tmp/x {flag}"
    assert (with_ieee_gpu_division("--xla_backend_extra_options=-foo=1 --a=b")
            == "--xla_backend_extra_options=-foo=1,-nvptx-prec-divf32=2 --a=b")
    assert with_ieee_gpu_division(f"--a=b {flag}") == f"--a=b {flag}"
    keep = "--xla_backend_extra_options=-nvptx-prec-divf32=1"  # the user's explicit choice stays
    assert with_ieee_gpu_division(keep) == keep


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


def test_warns_when_the_gpu_division_flag_came_too_late(monkeypatch):
    """A flag set after JAX started its GPU backend is ignored by XLA; quantize() says so."""
    from jaxquant.numerics import _exact

    assert _exact._gpu_divides_exactly()  # no CUDA GPU here: nothing to probe
    monkeypatch.setenv("XLA_FLAGS", IEEE_GPU_DIVISION_FLAG)
    monkeypatch.setattr(_exact, "_gpu_divides_exactly", lambda: False)
    with pytest.warns(RuntimeWarning, match="set after JAX started its GPU backend"):
        assert not _exact.warn_if_gpu_division_flag_ignored()
    monkeypatch.setattr(_exact, "_gpu_divides_exactly", lambda: True)
    assert _exact.warn_if_gpu_division_flag_ignored()
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(_exact, "_gpu_divides_exactly", lambda: False)
    assert _exact.warn_if_gpu_division_flag_ignored()  # no flag: the integer rounding is exact anyway


def test_div_has_the_quotient_rule_derivative_on_every_platform():
    """The integer rounding has no derivative of its own (its bit operations give zero), so div
    carries the quotient rule: the same gradient whichever branch XLA compiles."""
    a, b = np.float32(1.5), np.float32(-0.75)
    ga, gb = jax.grad(lambda a, b: div(a, b), argnums=(0, 1))(a, b)
    np.testing.assert_allclose([ga, gb], [1 / b, -a / b**2], rtol=1e-6)
    assert float(jax.grad(lambda a: round_quotient(a, b, a / b))(a)) == 0.0  # why div needs the rule
