"""FP4 E2M1 elements: rounding, 4-bit codes, packing two codes per byte.

E2M1 magnitudes are ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (codes 0..7); bit 3 of a code is the sign, so
``VALUES[c] == (-1)**(c >> 3) * VALUES[c & 7]``. Rounding is to nearest with ties to the even code
(the one whose mantissa bit is 0), saturating at 6. On a magnitude ``a``:

    a <= 0.25 -> 0     a < 0.75 -> 0.5    a <= 1.25 -> 1    a < 1.75 -> 1.5
    a <= 2.5  -> 2     a < 3.5  -> 3      a <= 5    -> 4    otherwise  -> 6

This is ModelOpt's Triton ``fp4_round_magnitude`` and, on codes, its export ``NVFP4QTensor._cast_fp4``.
Everything here is compare/select arithmetic, so it lowers on every XLA backend (no FP4 dtype
needed). NaN fails every comparison: it rounds to magnitude 6 (code 7), like both ModelOpt paths.
A negative value that rounds to zero keeps its sign bit (code 8, "-0"); exact ``-0.0`` gets code 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

E2M1_MAX = 6.0

#: code -> value (float32); code 8 ("-0") decodes to +0.0 like ModelOpt's ``e2m1_values`` table.
VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32
)

# (bound, inclusive): magnitude index i is chosen when a (<= or <) bound i, else index 7.
_BOUNDS = ((0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True))


def _select_by_bounds(a: jax.Array, outputs) -> jax.Array:
    """``outputs[i]`` for the first bound that ``a`` falls under, ``outputs[7]`` if none (NaN too)."""
    out = jnp.full(a.shape, outputs[7], dtype=jnp.asarray(outputs).dtype)
    for (bound, inclusive), value in zip(reversed(_BOUNDS), reversed(outputs[:7])):
        below = a <= bound if inclusive else a < bound
        out = jnp.where(below, jnp.asarray(value, out.dtype), out)
    return out


@jax.jit
def round_magnitude(a: jax.Array) -> jax.Array:
    """Round magnitudes ``a >= 0`` (float32) to the nearest E2M1 magnitude (float32), saturating at 6."""
    return _select_by_bounds(a, np.asarray(VALUES[:8], np.float32))


@jax.jit
def is_negative(x: jax.Array) -> jax.Array:
    """``x < 0`` for float32 ``x``, read from the bits so that it also holds for negative subnormals.

    XLA's CPU backend treats subnormal operands as zero (DAZ), so ``x < 0`` would be False for
    ``-1e-40``; torch and the GPU say True. -0.0 and NaN are not negative.
    """
    b = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    mag = b & jnp.uint32(0x7FFFFFFF)
    return ((b >> 31) == 1) & (mag != 0) & (mag <= jnp.uint32(0x7F800000))


@jax.jit
def to_codes(x: jax.Array) -> jax.Array:
    """Round float32 values to 4-bit E2M1 codes (uint8 in 0..15); sign in bit 3, ``-tiny -> 8``."""
    x = jnp.asarray(x, jnp.float32)
    mag = _select_by_bounds(jnp.abs(x), np.arange(8, dtype=np.uint8))
    return jnp.where(is_negative(x), mag | jnp.uint8(8), mag)


@jax.jit
def from_codes(codes: jax.Array) -> jax.Array:
    """Decode 4-bit codes (low nibble of a uint8 array) to float32 values (code 8 -> +0.0)."""
    c = jnp.asarray(codes, jnp.uint8)
    mag_code = c & 7
    e = (mag_code >> 1).astype(jnp.int32)
    m = (mag_code & 1).astype(jnp.float32)
    # e == 0: 0 or 0.5 (subnormal); e >= 1: (1 + m/2) * 2^(e-1), built from the exponent bits exactly.
    pow2 = jax.lax.bitcast_convert_type(((e + 126) << 23).astype(jnp.uint32), jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * pow2)
    negative = ((c & 8) != 0) & (mag_code != 0)
    return jnp.where(negative, -mag, mag)


@jax.jit
def pack(codes: jax.Array) -> jax.Array:
    """Pack codes ``uint8 [..., K]`` (K even) into bytes ``uint8 [..., K/2]``: element 2j in the low nibble."""
    codes = jnp.asarray(codes, jnp.uint8)
    k = codes.shape[-1]
    if k % 2:
        raise ValueError(f"pack needs an even last dimension, got shape {codes.shape}")
    pairs = codes.reshape(*codes.shape[:-1], k // 2, 2)
    return (pairs[..., 0] & 0xF) | (pairs[..., 1] << 4)


@jax.jit
def unpack(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack`: ``uint8 [..., K/2] -> uint8 [..., K]`` codes."""
    packed = jnp.asarray(packed, jnp.uint8)
    pairs = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
