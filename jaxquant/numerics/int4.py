"""INT4 (signed, codes -8..7) in blocks along the last axis, bit-exact with ModelOpt's ``int4_per_block`` quantizer
and its W4A16_AWQ / W4A8_AWQ export.

Fake quant (``tensor_quant.py::_tensor_quant`` on ``[..., n/block, block]``, one amax per block; the last axis is
zero-padded to whole blocks as ``_setup_for_blockquant`` does)::

    scale = 7 / amax;  q = clip(round_half_even(f32(x) * scale), -8, 7);  out = q / scale   (amax <= 2^-24: 0)

Export (``quant_utils.py``): ``weight_scale = amax / 7`` (float32, ``[out, in/block]``; a zero amax gives 1.0) and
``codes = clip(round_half_even(w / weight_scale), -8, 7)`` with the weight in the export dtype divided in float32 by
its block's scale; then ``pack_int4_in_uint8``: two **output rows** per byte, row ``2k`` in the low nibble and row
``2k + 1`` in the high nibble (two's complement nibbles), ``[out/2, in]`` uint8 (per expert for stacked experts).
As for INT8, the export divides where fake quant multiplies, so a few codes in a million differ between the two,
in ModelOpt as here. Dequantization is ``code * weight_scale`` in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.numerics._exact import div
from jaxquant.numerics.fp8 import export_scale
from jaxquant.numerics.int8 import integer_fake_quant

INT4_MAX = 7.0
INT4_MIN = -8.0


def to_blocks(x: jax.Array, block: int) -> jax.Array:
    """``[..., n]`` -> ``[..., ceil(n/block), block]``, the last axis zero-padded to whole blocks."""
    n = x.shape[-1]
    nb = -(-n // block)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
    return x.reshape(*x.shape[:-1], nb, block)


def from_blocks(b: jax.Array, n: int) -> jax.Array:
    """The inverse of ``to_blocks``: ``[..., nb, block]`` -> ``[..., n]`` (padding cropped)."""
    return b.reshape(*b.shape[:-2], -1)[..., :n]


@functools.partial(jax.jit, static_argnames=("block",))
def fake_quant(x: jax.Array, amax, block: int) -> jax.Array:
    """Quantize-dequantize ``x`` to INT4 in blocks of ``block`` along the last axis; ``amax`` ``[..., nb, 1]`` (one
    per block, broadcastable to ``to_blocks(x)``). Result in ``x``'s dtype."""
    return from_blocks(integer_fake_quant(to_blocks(x, block), amax, INT4_MAX), x.shape[-1])


@jax.jit
def scale_from_amax(amax) -> jax.Array:
    """Export scale ``amax / 7`` (float32; a zero amax gives 1.0; clamped to float32's positive range)."""
    return export_scale(amax, INT4_MAX)


@jax.jit
def quantize(w: jax.Array, amax) -> tuple[jax.Array, jax.Array]:
    """Real INT4 quantization of ``w`` ``[..., out, in]`` with block amax ``[..., out, in/block]``: ``(codes int8
    [..., out, in], scale float32 [..., out, in/block])``, ``codes = clip(round_half_even(f32(w) / scale), -8, 7)``."""
    scale = scale_from_amax(amax)
    nb = scale.shape[-1]
    blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], nb, -1)
    q = jnp.clip(jnp.round(div(blocks, scale[..., None])), INT4_MIN, INT4_MAX)
    return q.reshape(w.shape).astype(jnp.int8), scale


@jax.jit
def pack_rows(codes: jax.Array) -> jax.Array:
    """INT4 codes ``[..., out, in]`` (int8 in -8..7, ``out`` even) -> uint8 ``[..., out/2, in]``: row ``2k`` in the low
    nibble, row ``2k + 1`` in the high nibble."""
    u = codes.astype(jnp.uint8) & jnp.uint8(0x0F)
    u = u.reshape(*u.shape[:-2], u.shape[-2] // 2, 2, u.shape[-1])
    return u[..., 0, :] | (u[..., 1, :] << jnp.uint8(4))


@jax.jit
def unpack_rows(packed: jax.Array) -> jax.Array:
    """The inverse of ``pack_rows``: uint8 ``[..., out/2, in]`` -> int8 codes ``[..., out, in]``."""
    lo = (packed & jnp.uint8(0x0F)).astype(jnp.int8)
    hi = (packed >> jnp.uint8(4)).astype(jnp.int8)
    both = jnp.stack([lo, hi], axis=-2)  # [..., out/2, 2, in]
    both = jnp.where(both > 7, both - 16, both).astype(jnp.int8)
    return both.reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1])


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(codes: jax.Array, scale, dtype=jnp.float32) -> jax.Array:
    """``codes * scale`` per block in float32, then ``dtype``: codes ``[..., out, in]``, scale ``[..., out, nb]``."""
    scale = jnp.asarray(scale, jnp.float32)
    nb = scale.shape[-1]
    blocks = codes.astype(jnp.float32).reshape(*codes.shape[:-1], nb, -1) * scale[..., None]
    return blocks.reshape(codes.shape).astype(dtype)


__all__ = ["INT4_MAX", "INT4_MIN", "dequantize", "fake_quant", "from_blocks", "pack_rows", "quantize",
           "scale_from_amax", "to_blocks", "unpack_rows"]
