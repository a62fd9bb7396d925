"""INT8 (signed, 8 bits, ``narrow_range=False``) fake quantization and real quantization, bit-exact with ModelOpt.

Fake quant is ModelOpt's ``tensor_quant.py::_tensor_quant`` (also what its CUDA extension computes), per tensor
or per channel (``amax`` broadcastable to ``x``), all in float32::

    scale = 127 / amax                       # a true division (127 is a tensor there, not a Python scalar)
    scale = 0 where amax <= 2^-24            # a zero channel quantizes to 0
    q = clip(round_half_even(f32(x) * scale), -128, 127)
    scale = 1 where amax <= 2^-24
    return (q / scale).astype(x.dtype)

Export (``modelopt.torch.export.quant_utils``, the ``W8A16`` weight-only format): ``weight_scale = amax / 127``
(float32; a zero amax becomes 127, i.e. scale 1.0) and ``q = int8(clip(round_half_even(w / weight_scale),
-128, 127))`` with the weight in the export dtype divided by the float32 scale (so in float32). The two paths
round differently (``x * (127 / amax)`` against ``x / (amax / 127)``): a few weights in a million land one
code apart, exactly as in ModelOpt, whose fake-quantized model and exported checkpoint differ the same way.
Dequantization is ``q.astype(dtype) * scale.astype(dtype)`` (``from_quantized_weight``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.numerics._exact import div, round_to_dtype
from jaxquant.numerics.fp8 import export_scale

INT8_MAX = 127.0
INT8_MIN = -128.0
#: ModelOpt's "zero amax" threshold (the smallest fp16 subnormal).
AMAX_EPS = 2.0**-24


def _f32(a) -> jax.Array:
    return jnp.asarray(a, jnp.float32)


def integer_fake_quant(x: jax.Array, amax, max_bound: float) -> jax.Array:
    """ModelOpt's signed integer fake quant (``narrow_range=False``: codes ``[-max_bound-1, max_bound]``) with
    ``amax`` broadcastable to ``x``; float32 math, result in ``x``'s dtype; ``amax <= 2^-24`` gives zero.
    Traceable (INT8: ``max_bound`` 127, INT4: 7)."""
    amax = _f32(amax)
    zero = amax <= AMAX_EPS
    scale = div(jnp.float32(max_bound), amax)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) * jnp.where(zero, jnp.float32(0.0), scale)),
                 -max_bound - 1.0, max_bound)
    return div(q, jnp.where(zero, jnp.float32(1.0), scale)).astype(x.dtype)


@jax.jit
def fake_quant(x: jax.Array, amax) -> jax.Array:
    """Quantize-dequantize ``x`` to signed INT8 with ``amax`` (scalar or broadcastable per channel); float32 math,
    result in ``x``'s dtype. A channel with ``amax <= 2^-24`` becomes (signed) zero."""
    return integer_fake_quant(x, amax, INT8_MAX)


@jax.jit
def scale_from_amax(amax) -> jax.Array:
    """Export scale ``amax / 127`` (float32, ``amax``'s shape): a zero amax becomes 127 (scale 1.0), and amax is
    clamped to the positive float32 range, as ModelOpt's ``export_amax``."""
    return export_scale(amax, INT8_MAX)


@jax.jit
def quantize(x: jax.Array, amax) -> tuple[jax.Array, jax.Array]:
    """Real INT8 quantization for export: ``(q int8 [x.shape], scale float32 [amax.shape])`` with
    ``q = clip(round_half_even(f32(x) / scale), -128, 127)``."""
    scale = scale_from_amax(amax)
    q = jnp.clip(jnp.round(div(x.astype(jnp.float32), scale)), INT8_MIN, INT8_MAX)
    return q.astype(jnp.int8), scale


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(q: jax.Array, scale, dtype=jnp.float32) -> jax.Array:
    """``q.astype(dtype) * scale.astype(dtype)`` (the product of two ``dtype`` values, exact in float32, rounded
    once to ``dtype`` as torch does)."""
    return (q.astype(jnp.float32) * round_to_dtype(_f32(scale), dtype)).astype(dtype)


__all__ = ["AMAX_EPS", "INT8_MAX", "INT8_MIN", "dequantize", "fake_quant", "integer_fake_quant", "quantize",
           "scale_from_amax"]
