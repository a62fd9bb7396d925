"""IEEE-exact float32 division under XLA.

ModelOpt's references divide exactly (IEEE, round to nearest even) in the order the code is
written. XLA does not always keep ``a / b`` as a correctly rounded division:

* its algebraic simplifier rewrites ``A / const`` into ``A * (1/const)``, ``(A / B) / C`` into
  ``A / (B * C)`` and ``A / (B / C)`` into ``(A * C) / B``;
* its CPU backend computes a division by a broadcast divisor (a scalar, or a per-row/per-block
  value) as a multiplication by the divisor's reciprocal.

Each of these changes the last bit of some quotients. :func:`div` keeps the division exact with two
selects that do not change any result but hide the patterns: the divisor becomes
``d = where(isnan(a), 1, b)`` (a NaN dividend gives NaN whatever the divisor) and the dividend
``where(isnan(d), nan, a)``. Neither is a constant, a broadcast or a quotient any more, so XLA
emits a plain elementwise divide. The selects are elementwise and fuse; they cost no memory traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def opaque(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but invisible to XLA's algebraic simplifier (use on small arrays only)."""
    return lax.optimization_barrier(x)


def div(a, b) -> jax.Array:
    """IEEE float32 ``a / b`` exactly as written (no reciprocal or reassociation rewrites)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    divisor = jnp.where(jnp.isnan(a), jnp.float32(1.0), b)
    dividend = jnp.where(jnp.isnan(divisor), jnp.float32(jnp.nan), a)  # depends on a: never folded
    return dividend / divisor


# ----------------------------------------------------------------------------- narrow float values
# XLA's GPU backend (flag xla_allow_excess_precision, on by default) deletes a round trip of converts
# such as float32 -> float8_e4m3fn -> float32 or float32 -> bfloat16 -> float32, i.e. it skips the
# rounding we need. So a value is rounded with one convert and read back from its bits with
# integer arithmetic: no convert pair is left for XLA to remove.
def _from_bits(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def decode_e4m3(q: jax.Array) -> jax.Array:
    """float8_e4m3fn -> float32, exactly, from the bits (NaN -> NaN)."""
    b = lax.bitcast_convert_type(q, jnp.uint8).astype(jnp.uint32)
    e = (b >> 3) & 0xF
    m = b & 7
    normal = _from_bits(((e + 120) << 23) | (m << 20))  # (1 + m/8) * 2^(e-7)
    mag = jnp.where(e == 0, m.astype(jnp.float32) * jnp.float32(2.0**-9), normal)
    mag = jnp.where((e == 15) & (m == 7), jnp.float32(jnp.nan), mag)
    return jnp.where((b & 0x80) != 0, -mag, mag)


def decode_f16(h: jax.Array) -> jax.Array:
    """float16 -> float32, exactly, from the bits."""
    b = lax.bitcast_convert_type(h, jnp.uint16).astype(jnp.uint32)
    e = (b >> 10) & 0x1F
    m = b & 0x3FF
    normal = _from_bits(((e + 112) << 23) | (m << 13))
    special = _from_bits((jnp.uint32(0xFF) << 23) | (m << 13))  # inf / nan
    mag = jnp.where(e == 0, m.astype(jnp.float32) * jnp.float32(2.0**-24), jnp.where(e == 31, special, normal))
    return jnp.where((b & 0x8000) != 0, -mag, mag)


def round_to_e4m3(x: jax.Array) -> jax.Array:
    """float32 rounded to the nearest float8_e4m3fn value (ties to even), as float32 (|x| <= 448).

    One convert, read back from the bits (so XLA cannot drop the rounding as excess precision).
    """
    return decode_e4m3(to_e4m3(x))


def to_e4m3(x: jax.Array) -> jax.Array:
    """float32 (``|x| <= 448``, callers clamp) -> float8_e4m3fn, round to nearest even."""
    return jnp.asarray(x, jnp.float32).astype(jnp.float8_e4m3fn)


def to_e4m3_arith(x: jax.Array) -> jax.Array:
    """:func:`to_e4m3` in integer arithmetic only, for a backend without an FP8 convert.

    Tested bit-identical to the cast; a drop-in replacement for the ``astype`` in :func:`to_e4m3`
    (on an H100 it makes the FP8 export kernel about 1.8x slower, so it is not the default).
    """
    v = _round_e4m3_bits(x)
    b = lax.bitcast_convert_type(v, jnp.uint32)
    sign = (b >> 24) & 0x80
    exp = ((b >> 23) & 0xFF).astype(jnp.int32) - 127
    mant3 = (b >> 20) & 7
    normal = (((exp + 7).astype(jnp.uint32) & 0xF) << 3) | mant3
    sub = (jnp.abs(v) * jnp.float32(2.0**9)).astype(jnp.uint32)  # 0..7 quanta of 2^-9
    code = jnp.where(exp >= -6, normal, sub) | sign
    code = jnp.where(jnp.isnan(v), jnp.uint32(0x7F), code)
    return lax.bitcast_convert_type(code.astype(jnp.uint8), jnp.float8_e4m3fn)


def round_to_dtype(x: jax.Array, dtype) -> jax.Array:
    """float32 ``x`` rounded to ``dtype`` (bfloat16 / float16 / float32), returned as float32."""
    dtype = jnp.dtype(dtype)
    x = jnp.asarray(x, jnp.float32)
    if dtype == jnp.float32:
        return x
    if dtype == jnp.bfloat16:
        b = lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
        return _from_bits(b << 16)
    if dtype == jnp.float16:
        return decode_f16(x.astype(jnp.float16))
    raise TypeError(f"round_to_dtype: unsupported dtype {dtype}")


def _round_e4m3_bits(x: jax.Array) -> jax.Array:
    """``x.astype(float8_e4m3fn).astype(float32)`` computed with integer arithmetic only.

    Round to nearest even on the E4M3 grid: 3 mantissa bits for exponents >= -6, a fixed quantum
    of 2^-9 below. For ``|x| <= 448`` (callers clamp first); NaN stays NaN. Tested bit-exact against
    torch's and ml_dtypes' casts; needs no FP8 support from the backend (see :func:`to_e4m3_arith`).
    """
    x = jnp.asarray(x, jnp.float32)
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = b & jnp.uint32(0x80000000)
    exp = ((b >> 23) & 0xFF).astype(jnp.int32) - 127
    sig = (b & jnp.uint32(0x7FFFFF)) | jnp.uint32(0x800000)
    drop = 20 + jnp.maximum(0, -6 - exp)  # low significand bits below the E4M3 quantum
    drop_u = jnp.minimum(drop, 24).astype(jnp.uint32)
    half = (jnp.uint32(1) << (drop_u - 1)) - 1
    r = ((sig + half + ((sig >> drop_u) & 1)) >> drop_u) << drop_u  # round half to even
    pow2 = jax.lax.bitcast_convert_type(((exp + 104) << 23).astype(jnp.uint32), jnp.float32)  # 2^(exp-23)
    mag = jnp.where(drop >= 25, jnp.float32(0.0), r.astype(jnp.float32) * pow2)
    y = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(mag, jnp.uint32) | sign, jnp.float32)
    return jnp.where(jnp.isnan(x), x, y)
