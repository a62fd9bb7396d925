"""The normalized Hadamard rotation ModelOpt applies to a quantizer's input when its config has ``rotate: true``
(``normalized_hadamard_transform``: ``fast_hadamard_transform.hadamard_transform(x, scale=block**-0.5)`` over blocks
of the last axis).

``rotate(x, block_size, fp32)`` splits the last axis into blocks of ``block_size`` (a power of two; None: the whole
axis if a power of two, else its largest power-of-two divisor, as ModelOpt), multiplies each block by the Sylvester
Hadamard matrix ``H`` (``H_2n = [[H_n, H_n], [H_n, -H_n]]``, ``scipy.linalg.hadamard``'s order) with a fast
Walsh-Hadamard butterfly in float32, scales by ``block_size ** -0.5`` and rounds back to ``x``'s dtype (``fp32``:
ModelOpt's ``rotate_fp32`` casts the input to float32 first, the result is cast back the same way). ``H / sqrt(n)`` is
orthonormal and symmetric, so rotating both Q and K leaves ``Q K^T`` unchanged.

ModelOpt's transform is a CUDA kernel (the ``fast_hadamard_transform`` package, no CPU path): jaxquant's butterfly is
checked against the exact transform (float64 matrix product), not against that kernel's float32 summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.errors import RecipeError


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def block_size_for(dim: int, block_size: int | None) -> int:
    """The rotation block ModelOpt uses for a last axis of ``dim`` (``RecipeError`` for an impossible one)."""
    bs = block_size
    if bs is None:
        bs = dim if dim & (dim - 1) == 0 else _largest_pow2_divisor(dim)
        if bs < 2:
            raise RecipeError(f"rotate: the last dimension {dim} has no power-of-2 divisor >= 2; set rotate.block_size.")
    if bs <= 0 or bs & (bs - 1):
        raise RecipeError(f"rotate: block_size must be a power of 2, got {bs}.")
    if dim % bs:
        raise RecipeError(f"rotate: the last dimension {dim} is not divisible by block_size {bs}.")
    return bs


def rotate(x: jax.Array, block_size: int | None = None, fp32: bool = False) -> jax.Array:
    """``x [..., D]`` rotated by the normalized Hadamard matrix per block of ``block_size`` of its last axis (module
    doc); the result has ``x``'s dtype."""
    dtype = x.dtype
    d = x.shape[-1]
    bs = block_size_for(d, block_size)
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], d // bs, bs)
    h = 1
    while h < bs:  # butterfly stage: pairs (i, i + h) in groups of 2h -> (a + b, a - b)
        y = y.reshape(*y.shape[:-1], bs // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape[:-1], d // bs, bs)
        h *= 2
    y = y * jnp.float32(bs ** -0.5)
    return y.reshape(x.shape).astype(dtype)


__all__ = ["block_size_for", "rotate"]
