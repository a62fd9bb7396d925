"""NVFP4: E2M1 elements in blocks of 16 along the last axis, E4M3 block scales, a float32 global scale.

Two-level scale: ``global_scale = global_amax / 2688`` (``6 * 448``, exported as ``weight_scale_2`` /
``input_scale``); each block's scale is ``e4m3(block_amax / (6 * global_scale))`` in units of the
global scale; an element is ``e2m1 * block_scale * global_scale``.

Three ModelOpt computations are ported, each bit-exact (docs/numerics.md lists the deviations):

* :func:`fake_quant_dynamic` — the Triton kernel ``fp4_fake_quant_block`` (default NVFP4 preset;
  block scales recomputed from the tensor every call, the global amax calibrated). No clamp of the
  block scale from below: an effective scale ``< 1e-5`` is replaced by 1.0.
* :func:`fake_quant_static` — ``static_blockwise_fp4_fake_quant`` (``nvfp4_static``: calibrated
  per-block amax; the block scale ``amax/6`` is FP8-fake-quantized with amax ``global_amax/6``).
* :func:`quantize` / :func:`dequantize` — export, ``NVFP4QTensor.quantize`` (block scale clamped to
  ``[2^-9, 448]``, zero block -> 1.0, elements divided by the scale and rounded to 4-bit codes, two
  codes per byte) and, with ``block_amax``, ``get_weights_scaling_factor_from_quantizer``.

Four-over-Six (``four_over_six: true`` on static blocks): ``fp8_norm`` 256 instead of 448 in the static fake quant
and export (``weight_scale_2 = global_amax / 1536``), so a block whose amax the calibration multiplied by 1.5 (its
largest element mapped onto 4 instead of 6) still has an E4M3 scale (at most 384).

Leading axes are batch axes (e.g. ``[E, out, in]`` stacked experts with a global amax of shape
``[E, 1, 1]``). A last axis that is not a multiple of the block is zero-padded, as ModelOpt pads
(``reduce_block_padding`` on export, zero-filled tiles in the Triton kernel); fake quant crops the
padding off again, export keeps it (``packed`` covers ``ceil(K/16)*16`` elements).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxquant.numerics import e2m1
from jaxquant.numerics._exact import decode_e4m3, div, opaque, round_to_e4m3, to_e4m3
from jaxquant.numerics.fp8 import E4M3_MAX
from jaxquant.numerics.fp8 import fake_quant as _fp8_fake_quant

E2M1_MAX = e2m1.E2M1_MAX
#: ``E2M1_MAX * E4M3_MAX``: the global scale maps amax onto the largest element times the largest scale.
GLOBAL_SCALE_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688.0
#: Four-over-Six's block-scale normalization (ModelOpt ``E4M3_MAX_46``): the global amax maps onto 256, not 448.
FOUR_OVER_SIX_FP8_NORM = 256.0
#: Export clamps block scales to the smallest positive E4M3 subnormal from below.
E4M3_MIN_SCALE = 2.0**-9


class NVFP4Tensor(NamedTuple):
    """A tensor in NVFP4 export layout (ModelOpt's unified checkpoint tensors).

    Attributes:
      packed: uint8 ``[..., Kp/2]`` — two E2M1 codes per byte, element 2j in the low nibble
        (``Kp`` = K rounded up to the block size).
      block_scale: float8_e4m3fn ``[..., Kp/block]`` — ``weight_scale``.
      global_scale: float32, ``()`` or broadcastable like ``[E, 1, 1]`` — ``weight_scale_2``.
    """

    packed: jax.Array
    block_scale: jax.Array
    global_scale: jax.Array


def _f32(a) -> jax.Array:
    return jnp.asarray(a, jnp.float32)


def global_scale(amax) -> jax.Array:
    """``amax / 2688`` in float32 (``weight_scale_2`` / ``input_scale``), amax's shape."""
    return div(amax, GLOBAL_SCALE_DIVISOR)


def _pad_last(x: jax.Array, block_size: int) -> jax.Array:
    pad = -x.shape[-1] % block_size
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``[..., K] -> [..., ceil(K/bs), bs]`` with zero padding."""
    x = _pad_last(x, block_size)
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def _check_block_size(block_size: int):
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even int, got {block_size!r}")


@functools.partial(jax.jit, static_argnames=("block_size",))
def block_amax(x: jax.Array, block_size: int = 16) -> jax.Array:
    """Per-block ``max|x|`` (float32) ``[..., ceil(K/block_size)]``; the last block is zero-padded."""
    _check_block_size(block_size)
    return jnp.max(jnp.abs(_blocks(x, block_size).astype(jnp.float32)), axis=-1)


def _unblock(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``[..., nb, bs] -> shape`` (drops the padding)."""
    y = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1])
    return y[..., : shape[-1]] if y.shape[-1] != shape[-1] else y


def _apply_block_scale(xb: jax.Array, scale: jax.Array) -> jax.Array:
    """Round ``xb / scale`` (float32 ``[..., nb, bs]``, scale ``[..., nb, 1]``) to E2M1, times scale.

    Elementwise like the Triton kernels: ``q = round(|x| / s)``, ``y = x >= 0 ? q*s : 0 - q*s``.
    Triton's unary minus is ``0 - y``, so a negative value that rounds to 0 gives +0.0, and NaN
    gives ``-(6*s)``.
    """
    x_abs = jnp.abs(xb)
    y = e2m1.round_magnitude(div(x_abs, scale)) * scale
    not_nonneg = e2m1.is_negative(xb) | jnp.isnan(xb)  # ``~(x >= 0)``, robust to CPU DAZ
    return jnp.where(not_nonneg & (y != 0), -y, y)


@functools.partial(jax.jit, static_argnames=("block_size",))
def fake_quant_dynamic(x: jax.Array, global_amax, block_size: int = 16) -> jax.Array:
    """NVFP4 fake quant with dynamic per-block scales (ModelOpt's Triton ``fp4_fake_quant_block``).

    Args:
      x: any float dtype, ``[..., K]``; blocks run along the last axis.
      global_amax: calibrated per-tensor amax, scalar or broadcastable to ``x.shape[:-1] + (1,)``
        (e.g. ``[E, 1, 1]`` for stacked experts).
      block_size: elements per block (static).

    Returns ``x``'s shape and dtype. Per block::

        gs = global_amax / 2688;  gs = gs if gs > 0 else 1e-12
        s = e4m3(min(block_max / (6 * gs), 448)) * gs;  s = s if s >= 1e-5 else 1.0
        y = sign(x) * round_e2m1(|x| / s) * s
    """
    _check_block_size(block_size)
    gs = global_scale(global_amax)
    gs = opaque(jnp.where(gs > 0, gs, jnp.float32(1e-12)))[..., None]  # [..., 1, 1] over blocks
    xb = _blocks(x, block_size).astype(jnp.float32)
    bmax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    s = jnp.minimum(div(bmax, 6.0 * gs), E4M3_MAX)
    s = round_to_e4m3(s) * gs
    s = jnp.where(s >= 1e-5, s, jnp.float32(1.0))
    y = _apply_block_scale(xb, s)
    return _unblock(y, x.shape).astype(x.dtype)


def _as_block_shape(block_amax, x_shape, block_size):
    nb = -(-x_shape[-1] // block_size)
    want = (*x_shape[:-1], nb)
    block_amax = _f32(block_amax)
    if block_amax.shape != want:
        if block_amax.size != math.prod(want):
            raise ValueError(
                f"block_amax of shape {block_amax.shape} does not match a tensor of shape {x_shape} "
                f"with blocks of {block_size} (expected {want})"
            )
        block_amax = block_amax.reshape(want)
    return block_amax


def static_block_scale(block_amax, global_amax, fp8_norm: float = E4M3_MAX) -> jax.Array:
    """Fake-quant block scale of the static kernel (float32, block_amax's shape).

    ``fp8_fake_quant(block_amax / 6, amax=global_amax * (448 / fp8_norm) / 6)`` (ModelOpt ``compute_fp4_scales``;
    ``fp8_norm`` is 256 for Four-over-Six, ``FOUR_OVER_SIX_FP8_NORM``, so M=4 blocks (amax x 1.5) fit under 448).
    """
    scale = div(block_amax, E2M1_MAX)
    if fp8_norm != E4M3_MAX:
        global_amax = _f32(global_amax) * jnp.float32(E4M3_MAX / fp8_norm)
    scale_amax = div(global_amax, E2M1_MAX)
    return opaque(_fp8_fake_quant(scale, scale_amax))


@functools.partial(jax.jit, static_argnames=("block_size", "fp8_norm"))
def fake_quant_static(x: jax.Array, block_amax, global_amax, block_size: int = 16,
                      fp8_norm: float = E4M3_MAX) -> jax.Array:
    """NVFP4 fake quant with calibrated per-block amax (ModelOpt ``static_blockwise_fp4_fake_quant``).

    Args:
      x: ``[..., K]``, any float dtype.
      block_amax: ``[..., ceil(K/block_size)]`` per-block amax (or any shape with as many elements).
      global_amax: scalar or broadcastable to ``block_amax`` (``[E, 1, 1]`` for stacked experts).
      fp8_norm: the E4M3 value the global amax's blocks map onto: 448, or 256 for Four-over-Six.

    Per block: ``s = fp8_fake_quant(block_amax/6, global_amax/6)``; a zero ``s`` zeroes the block,
    a NaN/Inf ``s`` is replaced by 1; then ``y = sign(x) * round_e2m1(|x| / s) * s``. There is no
    ``1e-5`` floor here (unlike the dynamic kernel).
    """
    _check_block_size(block_size)
    block_amax = _as_block_shape(block_amax, x.shape, block_size)
    scale = static_block_scale(block_amax, _f32(global_amax), fp8_norm)[..., None]
    safe = jnp.where((scale == 0) | ~jnp.isfinite(scale), jnp.float32(1.0), scale)
    xb = _blocks(x, block_size).astype(jnp.float32)
    y = _apply_block_scale(xb, safe)
    y = jnp.where(scale == 0, jnp.float32(0.0), y)
    return _unblock(y, x.shape).astype(x.dtype)


def _export_block_scale(block_amax, wsf2) -> jax.Array:
    """Dynamic export: ``e4m3(clamp(where(s == 0, 1, s), 2^-9, 448))``, ``s = amax / (6 * wsf2)``."""
    s = div(block_amax, 6.0 * wsf2)
    s = jnp.where(s == 0, jnp.float32(1.0), s)
    return to_e4m3(jnp.clip(s, E4M3_MIN_SCALE, E4M3_MAX))


def _export_block_scale_static(block_amax, global_amax, fp8_norm: float = E4M3_MAX) -> jax.Array:
    """Static export (``get_weights_scaling_factor_from_quantizer``)::

    s = where(amax/6 == 0, 1, amax/6) * fp8_norm / (global_amax/6), clamp to [2^-9, 448], e4m3.
    """
    s = div(block_amax, E2M1_MAX)
    s = jnp.where(s == 0, jnp.float32(1.0), s)
    s = div(s * jnp.float32(fp8_norm), div(global_amax, E2M1_MAX))
    return to_e4m3(jnp.clip(s, E4M3_MIN_SCALE, E4M3_MAX))


@functools.partial(jax.jit, static_argnames=("block_size", "compute_dtype", "global_divisor", "fp8_norm"))
def quantize(x: jax.Array, *, global_amax=None, block_amax=None, block_size: int = 16,
             compute_dtype=None, global_divisor: float = GLOBAL_SCALE_DIVISOR,
             fp8_norm: float = E4M3_MAX) -> NVFP4Tensor:
    """Real NVFP4 quantization for export (ModelOpt ``NVFP4QTensor.quantize``).

    Args:
      x: ``[..., K]`` weights (any float dtype). K is zero-padded up to a multiple of ``block_size``.
      global_amax: per-tensor amax (scalar or ``[E, 1, 1]``); default ``max|x|`` (ModelOpt's
        ``get_weights_scaling_factor_2``). ``weight_scale_2 = global_amax / 2688``.
      block_amax: calibrated per-block amax of a static quantizer (``[..., ceil(K/bs)]``): the block
        scales then come from it, not from ``x`` (``get_weights_scaling_factor_from_quantizer``);
        ``global_amax`` then defaults to ``max(block_amax)``.
      compute_dtype: ModelOpt packs ``weight.to(dtype)`` (the export dtype) while the block scales
        come from the weight as it is; with a ``compute_dtype`` other than ``x``'s, the elements are
        cast to it before the division (default: none, the elements are ``x``'s).
      global_divisor: ``weight_scale_2 = global_amax / global_divisor``: 2688 (6 x 448) for NVFP4; 448 for
        ModelOpt's W4A8_NVFP4_FP8, whose kernels dequantize the weight to FP8; 1536 (6 x 256) for Four-over-Six.
      fp8_norm: the E4M3 value a static block of amax ``global_amax`` gets (448; 256 for Four-over-Six).

    A ``global_amax`` of 0 (an all-zero tensor) is replaced by 6, the quantizer's maxbound, as
    ModelOpt's ``export_amax`` does for activation scales: the result is zero codes, block scales 1.0
    and ``weight_scale_2 = 1/448`` (ModelOpt's weight export writes NaN block scales there).
    """
    _check_block_size(block_size)
    xb = _blocks(x, block_size).astype(jnp.float32)
    if global_amax is None:
        global_amax = jnp.max(block_amax) if block_amax is not None else jnp.max(jnp.abs(xb))
    global_amax = _f32(global_amax)
    global_amax = jnp.where(global_amax == 0, jnp.float32(E2M1_MAX), global_amax)
    wsf2 = global_scale(global_amax) if global_divisor == GLOBAL_SCALE_DIVISOR else div(global_amax, global_divisor)
    if block_amax is None:
        scale = _export_block_scale(jnp.max(jnp.abs(xb), axis=-1), opaque(wsf2))
    else:
        scale = _export_block_scale_static(_as_block_shape(block_amax, x.shape, block_size), global_amax, fp8_norm)
    denom = opaque(decode_e4m3(scale) * wsf2)
    if compute_dtype is not None and jnp.dtype(compute_dtype) != x.dtype:
        xb = _blocks(x.astype(compute_dtype), block_size).astype(jnp.float32)
    codes = e2m1.to_codes(div(xb, denom[..., None]))
    codes = codes.reshape(*codes.shape[:-2], -1)
    return NVFP4Tensor(e2m1.pack(codes), scale, wsf2)


@functools.partial(jax.jit, static_argnames=("dtype", "shape"))
def dequantize(t: NVFP4Tensor, dtype=jnp.float32, shape: tuple[int, ...] | None = None) -> jax.Array:
    """Decode an :class:`NVFP4Tensor` (ModelOpt ``NVFP4QTensor.dequantize``), float32 math.

    ``value = e2m1 * (f32(block_scale) * global_scale)``, cast to ``dtype``. ``shape`` (the original
    shape) crops the block padding; by default the padded shape is returned.
    """
    packed, block_scale, gs = t
    gs = _f32(gs)
    per_block = decode_e4m3(block_scale) * gs
    vals = e2m1.from_codes(e2m1.unpack(packed))
    nb = block_scale.shape[-1]
    vals = vals.reshape(*vals.shape[:-1], nb, vals.shape[-1] // nb) * per_block[..., None]
    y = vals.reshape(*vals.shape[:-2], -1)
    if shape is not None:
        shape = tuple(shape)
        if y.shape[:-1] != shape[:-1] or not (0 < shape[-1] <= y.shape[-1]):
            raise ValueError(f"shape {shape} does not fit a quantized tensor of shape {y.shape}")
        y = y[..., : shape[-1]]
    return y.astype(dtype)
