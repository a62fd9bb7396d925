"""MXINT8 and MXFP6 fake quant: E8M0 power-of-two scales per block, as ModelOpt's fused MX kernel computes them.

ModelOpt 0.47 quantizes these only in a CUDA kernel (``kernels/quantization/gemm/tensor_quant_mx.cu``,
``fused_amax_convert``, reached from ``TensorQuantizer`` for ``block_sizes {-1: 32, type: dynamic, scale_bits:
e8m0}``); it has no CPU path, no ``QTensor`` for them and no export (``export_hf_checkpoint`` raises
``NotImplementedError`` for E3M2 weights and fails with a ``TypeError`` on MXINT8). This module implements that
kernel's arithmetic as written, in exact IEEE float32 (the kernel's ``__host__`` semantics), per block of
``block`` elements along the last axis (the last block zero-padded):

    amax  = max |x| over the block (NaN ignored, +-inf counted as FLT_MAX)
    r     = amax / elem_max                     # float32, round to nearest even
    e     = ceil(log2 r) read from r's bits     # "NV" E8M0 rule: -127 for r <= 2^-127, 127 at the top
    q     = round(|x| * 2^-e)                   # INT8: rint, saturated at 127; FP6: the element table
    x~    = sign(x) * q * 2^e                   # then cast to x's dtype

with ``e = 0`` (scale 1) for a block whose amax is 0. ``elem_max`` is 127 (MXINT8: symmetric INT8 elements, the
kernel's "INT8"), 28 (E3M2) or 7.5 (E2M3). The FP6 tables round to the nearest value and break a tie at bound
``i`` toward value ``i`` for even ``i`` and value ``i + 1`` for odd ``i`` (the kernel's ``round_to_even``); values
past the last bound and infinities saturate to the largest element.

Where the kernel is undefined or its GPU build differs, jaxquant chooses: a zero gives +0 (the kernel leaves the
sign of zero uninitialised), NaN stays NaN (the kernel saturates it with an undefined sign, or converts NaN to an
integer), INT8 infinities saturate to +-127. The kernel is compiled with ``--use_fast_math``, so on the GPU
subnormal inputs and products are flushed to zero and the division ``amax / elem_max`` is approximate; this module
keeps subnormals (they only matter for blocks whose amax is below about 1e-36) and divides exactly. Checking it
against the CUDA kernel needs a GPU (not done here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics._exact import div, mul_pow2
from jaxquant.numerics.mx import to_blocks

_E3M2_VALUES = (0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875, 1, 1.25, 1.5,
                1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28)
_E2M3_VALUES = tuple(i / 8 for i in range(16)) + tuple(2 + i / 4 for i in range(8)) + tuple(4 + i / 2 for i in range(8))

#: element format -> (largest element, representable magnitudes in increasing order; None for INT8)
ELEMENTS = {
    "int8": (127.0, None),
    "e3m2": (28.0, _E3M2_VALUES),
    "e2m3": (7.5, _E2M3_VALUES),
}


def _bounds(values) -> tuple[float, ...]:
    """Midpoints between consecutive values (exact in float32 for these tables)."""
    return tuple((a + b) / 2 for a, b in zip(values[:-1], values[1:]))


def block_amax(xb: jax.Array) -> jax.Array:
    """``max |x|`` over the last axis of float32 blocks as the kernel reduces it: NaN ignored, +-inf as FLT_MAX
    (on the bit patterns, so subnormals count)."""
    mag = lax.bitcast_convert_type(xb, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    mag = jnp.where(mag > jnp.uint32(0x7F800000), jnp.uint32(0), mag)  # NaN
    mag = jnp.minimum(mag, jnp.uint32(0x7F7FFFFF))  # inf -> FLT_MAX
    return lax.bitcast_convert_type(jnp.max(mag, axis=-1), jnp.float32)


def nv_exponent(amax: jax.Array, elem_max: float) -> jax.Array:
    """The kernel's E8M0 exponent (int32) of finite float32 block amaxes: ``ceil(log2(amax / elem_max))`` from
    the bits of the rounded quotient (127 for a quotient in the top binade, -127 at or below ``2^-127``), 0 for a
    zero amax."""
    amax = jnp.asarray(amax, jnp.float32)
    tiny = amax < jnp.float32(2.0**-100)  # the quotient may be subnormal: form it scaled, round it on the bits
    r = div(jnp.where(tiny, mul_pow2(amax, 64), amax), jnp.float32(elem_max))
    r = jnp.where(tiny, mul_pow2(r, -64), r)
    bits = lax.bitcast_convert_type(r, jnp.uint32)
    ef = ((bits >> 23) & 0xFF).astype(jnp.int32)
    sig = bits & jnp.uint32(0x7FFFFF)
    up = (sig > 0) & (ef != 0xFE) & ~((ef == 0) & (sig <= jnp.uint32(0x400000)))
    e = jnp.where(up, ef - 126, ef - 127)
    return jnp.where(amax == 0, 0, e)


def _round_table(y: jax.Array, values) -> jax.Array:
    """Nonnegative float32 ``y`` rounded on the kernel's table (ties by bound parity; saturating)."""
    vals = jnp.asarray(values, jnp.float32)
    bounds = _bounds(values)
    below = sum((y > jnp.float32(b)).astype(jnp.int32) for b in bounds)  # bounds strictly below y
    tie = sum((y == jnp.float32(b)).astype(jnp.int32) for b in bounds) > 0
    idx = jnp.where(tie & (below % 2 == 1), below + 1, below)
    return vals[jnp.minimum(idx, len(values) - 1)]


def _round_elements(y: jax.Array, element: str) -> jax.Array:
    elem_max, values = ELEMENTS[element]
    if values is None:  # INT8: rint (ties to even), saturated at 127
        return jnp.minimum(jnp.round(jnp.minimum(y, jnp.float32(elem_max))), jnp.float32(elem_max))
    return _round_table(y, values)


@functools.partial(jax.jit, static_argnames=("element", "block"))
def fake_quant(x: jax.Array, element: str, block: int = 32) -> jax.Array:
    """MX quantize-dequantize of ``x`` with ``element`` (``"int8"``, ``"e3m2"``, ``"e2m3"``) in blocks of ``block``
    along the last axis (any length; the last block zero-padded); the result has ``x``'s dtype."""
    n = x.shape[-1]
    xb = to_blocks(x.astype(jnp.float32), block)
    e = nv_exponent(block_amax(xb), ELEMENTS[element][0])[..., None]
    bits = lax.bitcast_convert_type(xb, jnp.uint32)
    mag = lax.bitcast_convert_type(bits & jnp.uint32(0x7FFFFFFF), jnp.float32)
    q = mul_pow2(_round_elements(mul_pow2(mag, -e), element), e)
    negative = ((bits >> 31) == 1) & ((bits & jnp.uint32(0x7FFFFFFF)) != 0)  # -0 in: +0 out (module doc)
    y = jnp.where(negative, -q, q)
    y = jnp.where(jnp.isnan(xb), xb, y)
    return y.reshape(*y.shape[:-2], -1)[..., :n].astype(x.dtype)


__all__ = ["ELEMENTS", "block_amax", "fake_quant", "nv_exponent"]
