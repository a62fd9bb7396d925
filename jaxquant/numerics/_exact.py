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

The hardware division itself is IEEE on the CPU only. XLA's GPU backend compiles it to the
approximate ``div.full.f32`` (up to 2 ulp, openxla/xla#37181) unless the process started with
:data:`IEEE_GPU_DIVISION_FLAG` in ``XLA_FLAGS``, and TPUs divide through a reciprocal approximation.
Where the division is not IEEE, :func:`div` takes the hardware quotient as a first guess and rounds
it exactly with integer arithmetic (:func:`round_quotient`): the remainder ``a - q*b`` is computed
exactly in 32-bit integers and the quotient moved to the correctly rounded value. The result is the
IEEE quotient bit for bit on any backend, whatever its division does (within 7 ulp). The flag only
buys speed (on an H100 the integer rounding makes the NVFP4 kernels about 2x slower); the ``jaxquant``
command sets it for its own process (:func:`with_ieee_gpu_division`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics.xla_flags import IEEE_GPU_DIVISION_FLAG, with_ieee_gpu_division  # noqa: F401 - re-exported


def opaque(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but invisible to XLA's algebraic simplifier (use on small arrays only)."""
    return lax.optimization_barrier(x)


def div(a, b) -> jax.Array:
    """IEEE float32 ``a / b`` (round to nearest even) exactly as written, on every backend.

    ``a`` and ``b`` broadcast against each other. Where the backend divides exactly (the CPU; a CUDA
    GPU under :data:`IEEE_GPU_DIVISION_FLAG`) this is :func:`hardware_div`; elsewhere its quotient is
    rounded exactly by :func:`round_quotient`. XLA picks the branch when it compiles for a platform.
    """
    return _platform_div(*_unrewritable(a, b))


@jax.custom_jvp
def _platform_div(a: jax.Array, b: jax.Array) -> jax.Array:
    exact = lambda x, y: round_quotient(x, y, x / y)  # noqa: E731
    return lax.platform_dependent(
        a, b,
        cpu=lambda x, y: x / y,
        cuda=lambda x, y: x / y if gpu_division_is_ieee() else exact(x, y),
        default=exact,
    )


@_platform_div.defjvp
def _platform_div_jvp(primals, tangents):
    """The quotient rule on every platform (the integer rounding itself has no derivative)."""
    a, b = primals
    da, db = tangents
    q = _platform_div(a, b)
    return q, (da - q * db) / b


def gpu_division_is_ieee() -> bool:
    """True when this process's ``XLA_FLAGS`` asks XLA's NVIDIA GPU backend for IEEE float32 division.

    XLA reads the flags when the GPU backend starts, so the flag must be in the environment before
    the first JAX computation (:func:`with_ieee_gpu_division`).
    """
    return "-nvptx-prec-divf32=2" in os.environ.get("XLA_FLAGS", "")


def warn_if_gpu_division_flag_ignored() -> bool:
    """Warn when ``XLA_FLAGS`` asks for IEEE GPU division but the GPU does not do it (probed once).

    That happens when the flag was put into the environment after JAX had started its GPU backend:
    :func:`div` then trusts a division that is approximate, and some scales can differ from
    ModelOpt's in the last bit. Returns True when all is well (also without a GPU or the flag).
    """
    if not gpu_division_is_ieee():
        return True
    ok = _gpu_divides_exactly()
    if not ok:
        import warnings

        warnings.warn(
            f"XLA_FLAGS contains {IEEE_GPU_DIVISION_FLAG}, but the GPU still divides approximately: the flag was "
            "set after JAX started its GPU backend. jaxquant's scales may differ from ModelOpt's in the last bit. "
            "Set XLA_FLAGS before the first JAX computation (or remove the flag: the numerics are then rounded "
            "exactly in integer arithmetic).", RuntimeWarning, stacklevel=3)
    return ok


@functools.cache
def _gpu_divides_exactly() -> bool:
    """True unless a CUDA GPU returns XLA's approximate ``div.full.f32`` quotient for a witness value."""
    try:
        gpu = jax.devices("cuda")[0]
    except RuntimeError:
        return True
    witness = jax.device_put(jnp.float32(3163.328613), gpu)  # div.full.f32 gives 0.99999994 for w / w
    return float(jax.jit(lambda w: w / w)(witness)) == 1.0


def hardware_div(a, b) -> jax.Array:
    """The backend's own float32 ``a / b``, safe from XLA's rewrites but not rounded exactly.

    IEEE on the CPU; up to 2 ulp off on NVIDIA GPUs (``div.full.f32``) unless XLA runs with
    ``--xla_backend_extra_options=-nvptx-prec-divf32=2``. For benchmarks of what :func:`div` costs.
    """
    dividend, divisor = _unrewritable(a, b)
    return dividend / divisor


def _unrewritable(a, b) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` as float32 of one shape, behind selects that keep XLA from rewriting ``a / b``."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    divisor = jnp.where(jnp.isnan(a), jnp.float32(1.0), b)
    dividend = jnp.where(jnp.isnan(divisor), jnp.float32(jnp.nan), a)  # depends on a: never folded
    return tuple(jnp.broadcast_arrays(dividend, divisor))


# ----------------------------------------------------------------------------- exact quotient rounding
_SIGN = 0x80000000
_INF_BITS = 0x7F800000


def _unpack(mag_bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|x| bits (finite, uint32) -> (significand in [2^23, 2^24) as uint32, unbiased exponent as int32).

    ``|x| = sig * 2^(exp - 23)``; subnormals are normalised (zero gives sig 0).
    """
    biased = (mag_bits >> 23).astype(jnp.int32)
    frac = mag_bits & jnp.uint32(0x7FFFFF)
    lz = jnp.clip(lax.clz(frac).astype(jnp.int32) - 8, 0, 24)  # shift that puts the top bit at bit 23
    sub = biased == 0
    sig = jnp.where(sub, frac << lz.astype(jnp.uint32), frac | jnp.uint32(0x800000))
    exp = jnp.where(sub, -126 - lz, biased - 127)
    return sig, exp


def _floor_div_small(num: jax.Array, den: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(floor(num / den), num % den == 0)`` for int32 ``num`` and ``0 < den < 2^30`` whose quotient is small.

    A float estimate (off by at most one: the operands are rounded to 24 bits) made exact with
    the integer remainder; cheaper than an integer division on GPUs. Exact for ``|num / den| < 2^20``.
    """
    k = jnp.floor(num.astype(jnp.float32) / den.astype(jnp.float32)).astype(jnp.int32)
    rem = num - k * den
    fix = jnp.where(rem < 0, -1, jnp.where(rem >= den, 1, 0))
    return k + fix, rem - fix * den == 0


def round_quotient(a: jax.Array, b: jax.Array, q: jax.Array) -> jax.Array:
    """The IEEE float32 quotient ``a / b`` (round to nearest even), given an approximation ``q``.

    ``q`` must be within 7 ulp of ``a / b`` (any hardware division is; a wrong zero or infinity
    from a flushing or overflowing division is tolerated where the exact quotient is within 7 ulp
    of it). Works on the 24-bit significands in 32-bit integer arithmetic: with ``T`` the exact
    quotient in units of the result's last place, the remainder ``R = T*mb - Q*mb`` of the guess
    ``Q`` is small, so it is exact modulo 2^32 even though ``T*mb`` is not, and
    ``Q + floor((2R + mb) / 2mb)`` is ``T`` rounded to nearest (ties to even). Subnormal inputs and
    results, overflow to infinity, zeros, infinities and NaN follow IEEE 754. Same shape as the inputs.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    a_bits = lax.bitcast_convert_type(a, jnp.uint32)
    b_bits = lax.bitcast_convert_type(b, jnp.uint32)
    q_bits = lax.bitcast_convert_type(q, jnp.uint32)
    sign = (a_bits ^ b_bits) & jnp.uint32(_SIGN)
    ma, ea = _unpack(a_bits & jnp.uint32(0x7FFFFFFF))
    mb, eb = _unpack(b_bits & jnp.uint32(0x7FFFFFFF))

    e_star = ea - eb - (ma < mb).astype(jnp.int32)      # exponent of the exact quotient
    qe = jnp.maximum(e_star - 23, -149)                 # exponent of its last place (subnormal floor)
    # In T's binade the float bits are linear in the value: bits(v) = base + v / 2^qe. So the guess
    # in units of the last place is its bits minus base (exact inside the binade, off by at most the
    # guess's own ulp distance across its edges), and the result's bits are base + the rounded T.
    base = (qe + 149) << 23
    q0 = jnp.minimum(q_bits & jnp.uint32(0x7FFFFFFF), jnp.uint32(_INF_BITS)).astype(jnp.int32) - base  # inf ~ 2^128
    # T = ma * 2^(ea - eb - qe) / mb = N / mb4 with N = ma * 2^s and mb4 = 4 mb; s is in [0, 26]
    # wherever the result is not forced to 0 or inf below.
    s = jnp.clip(ea - eb - qe + 2, 0, 31).astype(jnp.uint32)
    n = ma << s                                         # modulo 2^32: only R = N - Q*mb4 must be exact
    mb4 = mb << 2
    r = lax.bitcast_convert_type(n - q0.astype(jnp.uint32) * mb4, jnp.int32)
    k, tie = _floor_div_small(2 * r + mb4.astype(jnp.int32), 2 * mb4.astype(jnp.int32))  # round(R / mb4)
    qi = q0 + k
    qi = jnp.where(tie & ((qi & 1) == 1), qi - 1, qi)  # a tie rounds to the even neighbour
    bits = (base + jnp.maximum(qi, 0)).astype(jnp.uint32)  # carries into the exponent
    bits = jnp.where(e_star >= 128, jnp.uint32(_INF_BITS), bits)
    bits = jnp.where(e_star < -151, jnp.uint32(0), bits)  # below half the smallest subnormal

    # IEEE special cases, built here rather than trusted to the hardware division; tested on the
    # bits, since float comparisons treat subnormals as zero where the backend flushes them (XLA:CPU).
    a_mag, b_mag = a_bits & jnp.uint32(0x7FFFFFFF), b_bits & jnp.uint32(0x7FFFFFFF)
    a_zero, b_zero = a_mag == 0, b_mag == 0
    a_inf, b_inf = a_mag == _INF_BITS, b_mag == _INF_BITS
    bits = jnp.where(a_zero | b_inf, sign, bits | sign)
    bits = jnp.where(a_inf | b_zero, sign | jnp.uint32(_INF_BITS), bits)
    nan = (a_mag > _INF_BITS) | (b_mag > _INF_BITS) | (a_zero & b_zero) | (a_inf & b_inf)
    bits = jnp.where(nan, jnp.uint32(0x7FC00000), bits)
    return lax.bitcast_convert_type(bits, jnp.float32)


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


def abs_max_bits(x: jax.Array, axis) -> jax.Array:
    """``max(|x|)`` over ``axis`` of float32 ``x``, exactly, subnormals included (the maximum of the magnitudes'
    bit patterns, which order like the values): XLA's CPU backend treats subnormal operands of float ops as
    zero, torch does not. NaN wins over every number, as in torch's ``amax``."""
    mag = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    return lax.bitcast_convert_type(jnp.max(mag, axis=axis), jnp.float32)


def mul_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x * 2**k`` for float32 ``x`` and integer ``k``, rounded to nearest even like the IEEE product, with
    subnormal inputs and outputs (XLA's CPU backend flushes both to zero in a float multiply); overflow gives
    inf, NaN / inf inputs stay. Integer arithmetic only."""
    x = jnp.asarray(x, jnp.float32)
    b = lax.bitcast_convert_type(x, jnp.uint32)
    sign = b & jnp.uint32(0x80000000)
    ef = ((b >> 23) & 0xFF).astype(jnp.int32)
    mant = b & jnp.uint32(0x7FFFFF)
    sig = jnp.where(ef == 0, mant, mant | jnp.uint32(0x800000))  # value = sig * 2^(e - 150), e >= 1
    e = jnp.maximum(ef, 1) + jnp.asarray(k, jnp.int32)
    lz = (lax.clz(sig) - 8).astype(jnp.int32)  # shift that puts the leading one at bit 23
    sig_n = sig << jnp.clip(lz, 0, 31).astype(jnp.uint32)
    e_n = e - lz  # biased exponent of sig_n * 2^(e_n - 150)
    normal = (e_n.astype(jnp.uint32) << 23) | (sig_n & jnp.uint32(0x7FFFFF))
    shift = jnp.clip(1 - e_n, 0, 31).astype(jnp.uint32)  # subnormal: keep sig_n >> shift, rounded
    q = sig_n >> shift
    rem = sig_n & ((jnp.uint32(1) << shift) - 1)
    half = jnp.where(shift > 0, jnp.uint32(1) << jnp.maximum(shift, 1) - 1, jnp.uint32(0))
    up = (shift > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    sub = q + up.astype(jnp.uint32)  # a carry into bit 23 is the smallest normal, as it should be
    sub = jnp.where(1 - e_n >= 25, jnp.uint32(0), sub)
    mag = jnp.where(e_n >= 1, normal, sub)
    mag = jnp.where(e_n >= 255, jnp.uint32(0x7F800000), mag)
    mag = jnp.where(sig == 0, jnp.uint32(0), mag)
    out = lax.bitcast_convert_type(mag | sign, jnp.float32)
    return jnp.where(ef == 255, x, out)


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
