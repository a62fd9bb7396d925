"""MX block formats (OCP Microscaling): blocks of 32 elements along the last axis sharing one power-of-two
scale stored as E8M0 (a biased exponent byte): MXFP8 (E4M3 elements) and MXFP4 (E2M1 elements, two per byte).

MXFP8 is bit-exact with ModelOpt's ``MXFP8QTensor`` (``qtensor/mxfp8_tensor.py``, the export and its reference
quantizer)::

    amax   = max |x| over each block of 32 (zero-padded at the end of the last axis)
    e      = clamp(ceil(log2_f32(amax / 448)), -127, 127)     # -127 for a zero (or NaN) amax
    scale  = uint8(e + 127)                                    # the E8M0 byte: 2^e
    q      = e4m3(clamp(x * 2^-e, -448, 448))                  # round to nearest even
    x~     = q * 2^e

``log2_f32`` is a float32 logarithm, rounded before the ceil: for ``amax / 448`` just above a power of two
``2^k`` the rounded logarithm can be exactly ``k`` (then ``e = k`` and the largest element saturates at 448),
which is what torch computes; :func:`e8m0_exponent` reproduces that rounding from the bits. The products with
``2^-e`` and ``2^e`` are exact and computed on the bits (``_exact.mul_pow2``), so subnormal elements and
results are kept as torch keeps them (XLA's CPU backend would flush them to zero). One documented difference:
a block amax below ``448 * 2^-126`` (about 5e-36) makes ``amax / 448`` subnormal; that quotient is formed in
full precision and then rounded to the subnormal grid, so where that double rounding meets an exact tie its
last bit can differ from torch's single rounding and the exponent of that block be one higher (1 block of
518 400 in the adversarial test; real weights do not have such blocks). No global amax is used:
MX quantizers hold no calibrated state.

MXFP4 is bit-exact with ModelOpt's ``MXFP4QTensor``: ``e = ceil(max(log2_f32(amax / 6), -127))``, elements
``x * 2^-e`` encoded by counting the E2M1 bounds ``(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5)`` strictly below ``|x|``
(so ties round toward zero, not to even) with the sign bit set for negative values *and zero* (a zero is stored
as code 8, -0, as ModelOpt stores it), the even element of each pair in the low nibble.

ModelOpt's fake quant runs a CUDA kernel (``tensor_quant_mx.cu``) with no CPU path; it implements the same
formula (spec modelopt.md §2). jaxquant's fake quant is this module's ``quantize`` followed by ``dequantize``,
so a fake-quantized model computes exactly what its exported checkpoint holds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics._exact import abs_max_bits, decode_e4m3, div, mul_pow2, to_e4m3

BLOCK = 32
E8M0_BIAS = 127
E4M3_MAX = 448.0


def to_blocks(x: jax.Array, block: int = BLOCK) -> jax.Array:
    """``[..., n]`` -> ``[..., ceil(n/block), block]``, zero-padded at the end."""
    n = x.shape[-1]
    nb = -(-n // block)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
    return x.reshape(*x.shape[:-1], nb, block)


def _ceil_log2_f32(d: jax.Array) -> jax.Array:
    """``ceil(float32(log2(d)))`` for float32 ``d > 0``, subnormals included (int32), with the float32 rounding
    of the logarithm, read from the bits."""
    b = lax.bitcast_convert_type(d, jnp.uint32)
    ef = ((b >> 23) & 0xFF).astype(jnp.int32)
    mant = b & jnp.uint32(0x7FFFFF)
    lead = (31 - lax.clz(jnp.maximum(mant, 1))).astype(jnp.int32)  # subnormal: position of the leading one
    # d = 2^k * (1 + f), f in [0, 1)
    k = jnp.where(ef == 0, lead - 149, ef - 127)
    frac_bits = jnp.where(ef == 0, mant - (jnp.uint32(1) << lead.astype(jnp.uint32)), mant)
    f = jnp.where(ef == 0, frac_bits.astype(jnp.float32) * mul_pow2(jnp.float32(1.0), -lead),
                  frac_bits.astype(jnp.float32) * jnp.float32(2.0**-23))
    kf = k.astype(jnp.float32)
    gap = jnp.nextafter(kf, jnp.float32(jnp.inf)) - kf  # float32 spacing above k
    delta = jnp.log1p(f) * jnp.float32(1.4426950408889634)  # log2(1 + f)
    rounds_to_k = (k != 0) & (delta < gap * jnp.float32(0.5))
    return jnp.where((frac_bits == 0) | rounds_to_k, k, k + 1)


def e8m0_exponent(amax: jax.Array, elem_max: float = E4M3_MAX) -> jax.Array:
    """ModelOpt's ``_compute_e8m0_exponent``: ``clamp(ceil(log2(amax / elem_max)), -127, 127)`` (int32), -127 for
    a zero or NaN amax, 127 for an infinite one; ``amax`` float32 per block."""
    amax = jnp.asarray(amax, jnp.float32)
    # a quotient in the subnormal range is formed scaled up, then rounded to the subnormal grid on the bits
    # (XLA's CPU backend flushes subnormal results of a float division)
    tiny = amax < jnp.float32(2.0**-100)
    d = div(jnp.where(tiny, mul_pow2(amax, 64), amax), jnp.float32(elem_max))
    d = jnp.where(tiny, mul_pow2(d, -64), d)
    bits = lax.bitcast_convert_type(d, jnp.uint32)
    positive = (bits > 0) & (bits < jnp.uint32(0x7F800000))
    e = _ceil_log2_f32(jnp.where(positive, d, jnp.float32(1.0)))
    e = jnp.where(positive, e, -E8M0_BIAS)
    e = jnp.where(jnp.isinf(amax), E8M0_BIAS, e)
    return jnp.clip(e, -E8M0_BIAS, E8M0_BIAS)


def _block_exponent(xb: jax.Array) -> jax.Array:
    """E8M0 exponent ``[..., nb, 1]`` of blocks ``[..., nb, 32]`` (float32)."""
    return e8m0_exponent(abs_max_bits(xb, axis=-1))[..., None]


def _encode(xb: jax.Array, e: jax.Array) -> jax.Array:
    return to_e4m3(jnp.clip(mul_pow2(xb, -e), -E4M3_MAX, E4M3_MAX))


@jax.jit
def fake_quant(x: jax.Array) -> jax.Array:
    """MXFP8 quantize-dequantize of ``x`` (blocks of 32 along the last axis, any length); ``x``'s dtype."""
    n = x.shape[-1]
    xb = to_blocks(x.astype(jnp.float32))
    e = _block_exponent(xb)
    y = mul_pow2(decode_e4m3(_encode(xb, e)), e)
    return y.reshape(*y.shape[:-2], -1)[..., :n].astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def quantize(w: jax.Array, compute_dtype=None) -> tuple[jax.Array, jax.Array]:
    """MXFP8 weight for export: ``(q float8_e4m3fn [..., n], scale uint8 [..., n/32])``; ``n % 32 == 0``.

    The scales come from ``w`` as given, the codes from ``w`` cast to ``compute_dtype`` (the export dtype), as
    ModelOpt computes the E8M0 scale from the module's weight and quantizes ``weight.to(dtype)``."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP8 export needs the last dimension ({w.shape[-1]}) to be a multiple of {BLOCK}")
    e = _block_exponent(to_blocks(w.astype(jnp.float32)))
    src = w if compute_dtype is None else w.astype(compute_dtype)
    q = _encode(to_blocks(src.astype(jnp.float32)), e)
    return q.reshape(w.shape), (e[..., 0] + E8M0_BIAS).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``q * 2^(scale - 127)`` per block of 32, in ``dtype`` (``MXFP8QTensor.dequantize``)."""
    qb = to_blocks(decode_e4m3(q))
    e = scale.astype(jnp.int32)[..., None] - E8M0_BIAS
    y = mul_pow2(qb, e)
    return y.reshape(q.shape).astype(dtype)


# ----------------------------------------------------------------------------------------------- MXFP4
E2M1_MAX = 6.0
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _fp4_codes(y: jax.Array) -> jax.Array:
    """ModelOpt's ``cast_fp4``: uint8 codes 0..15 of float32 ``y`` (sign bit 8 for negatives and zeros)."""
    bits = lax.bitcast_convert_type(y, jnp.uint32)
    mag_bits = bits & jnp.uint32(0x7FFFFFFF)
    mag = lax.bitcast_convert_type(mag_bits, jnp.float32)
    order = sum((mag > jnp.float32(b)).astype(jnp.uint8) for b in _E2M1_BOUNDS)
    sign = ((bits >> 31) == 1) | (mag_bits == 0)
    return jnp.where(sign, jnp.uint8(8), jnp.uint8(0)) + order


def _fp4_values(codes: jax.Array) -> jax.Array:
    mag = jnp.asarray(_E2M1_VALUES, jnp.float32)[(codes & 7).astype(jnp.int32)]
    return jnp.where((codes & 8) != 0, -mag, mag)


def _fp4_blocks(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(codes [..., nb, 32], exponent [..., nb, 1])`` of float32 ``x32``."""
    xb = to_blocks(x32)
    e = e8m0_exponent(abs_max_bits(xb, axis=-1), E2M1_MAX)[..., None]
    return _fp4_codes(mul_pow2(xb, -e)), e


@jax.jit
def fake_quant_fp4(x: jax.Array) -> jax.Array:
    """MXFP4 quantize-dequantize of ``x`` (blocks of 32 along the last axis, any length); ``x``'s dtype."""
    n = x.shape[-1]
    codes, e = _fp4_blocks(x.astype(jnp.float32))
    y = mul_pow2(_fp4_values(codes), e)
    return y.reshape(*y.shape[:-2], -1)[..., :n].astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def quantize_fp4(w: jax.Array, compute_dtype=None) -> tuple[jax.Array, jax.Array]:
    """MXFP4 weight for export: ``(packed uint8 [..., n/2], scale uint8 [..., n/32])``, ``n % 32 == 0``; scales
    from ``w``, codes from ``w`` cast to ``compute_dtype`` (as ModelOpt: scale from the weight, codes from
    ``weight.to(dtype)``)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 export needs the last dimension ({w.shape[-1]}) to be a multiple of {BLOCK}")
    _, e = _fp4_blocks(w.astype(jnp.float32))
    src = (w if compute_dtype is None else w.astype(compute_dtype)).astype(jnp.float32)
    codes = _fp4_codes(mul_pow2(to_blocks(src), -e)).reshape(w.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (e[..., 0] + E8M0_BIAS).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_fp4(packed: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``e2m1 * 2^(scale - 127)`` per block of 32 (``MXFP4QTensor.dequantize``), in ``dtype``."""
    codes = jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    vb = to_blocks(_fp4_values(codes))
    y = mul_pow2(vb, scale.astype(jnp.int32)[..., None] - E8M0_BIAS)
    return y.reshape(codes.shape).astype(dtype)


__all__ = ["BLOCK", "E2M1_MAX", "E4M3_MAX", "E8M0_BIAS", "dequantize", "dequantize_fp4", "e8m0_exponent",
           "fake_quant", "fake_quant_fp4", "quantize", "quantize_fp4", "to_blocks"]
