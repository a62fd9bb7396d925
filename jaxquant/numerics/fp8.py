"""FP8 E4M3 (``float8_e4m3fn``) fake quantization and real quantization, bit-exact with ModelOpt.

Fake quant is ModelOpt's eager reference (``tensor_quant.py::_fp8_eager``, also what its CUDA
extension computes), per tensor or per channel (``amax`` broadcastable to ``x``)::

    safe_amax = amax if amax > 2^-24 else 1
    scale = (1 / safe_amax) * 448;  scale_inv = 1 / scale     # float32, rounded in this order
    y = e4m3(clip(f32(x) * scale, -448, 448)) * scale_inv      # e4m3 cast = round to nearest even
    return y.astype(x.dtype)

The scale is a reciprocal times 448, not ``448 / amax``: torch evaluates ``448.0 / t`` as
``t.reciprocal() * 448`` (``Tensor.__rtruediv__``, and ATen's C++ ``Scalar / Tensor`` in the CUDA
extension), and the two differ in the last bit for some amax.

Export (``modelopt.torch.export.quant_utils``): ``weight_scale = amax / 448`` (float32) and
``q = e4m3(w / weight_scale)`` (see :func:`quantize` for the dtype of the quotient); dequantization is ``q.astype(dtype) * scale.astype(dtype)``
(``FP8QTensor.dequantize``). See docs/numerics.md for where we deviate (zero amax, saturation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.numerics._exact import _round_e4m3_bits, decode_e4m3, div, opaque, round_to_dtype, round_to_e4m3, to_e4m3

E4M3_MAX = 448.0
#: ModelOpt's "zero amax" threshold in fake quant (the smallest fp16 subnormal).
AMAX_EPS = 2.0**-24


def _f32(a) -> jax.Array:
    return jnp.asarray(a, jnp.float32)


@jax.jit
def fake_quant(x: jax.Array, amax) -> jax.Array:
    """Quantize-dequantize ``x`` to FP8 E4M3 with ``amax`` (scalar or broadcastable per channel).

    Float32 math, result in ``x``'s dtype. ``amax <= 2^-24`` is treated as 1.0 (ModelOpt). NaN in
    ``x`` stays NaN; finite values saturate at ``+-amax``.
    """
    amax = _f32(amax)
    safe_amax = jnp.where(amax <= AMAX_EPS, jnp.float32(1.0), amax)
    scale = opaque(div(1.0, safe_amax) * E4M3_MAX)
    scale_inv = div(1.0, scale)
    scaled = jnp.clip(x.astype(jnp.float32) * scale, -E4M3_MAX, E4M3_MAX)
    y = round_to_e4m3(scaled) * scale_inv
    return y.astype(x.dtype)


@jax.jit
def scale_from_amax(amax) -> jax.Array:
    """Export scale ``amax / 448`` (float32, ``amax``'s shape): the ``weight_scale`` / ``input_scale``.

    Like ModelOpt's ``TensorQuantizer.export_amax``, a zero amax (a tensor or channel that is all
    zero, or never calibrated) becomes 448, i.e. scale 1.0, and amax is clamped to the positive
    float32 range ``[tiny, max]``. (ModelOpt also turns a NaN amax into 448; here NaN stays NaN:
    check inputs with ``checks.assert_finite`` first.)
    """
    return export_scale(amax, E4M3_MAX)


def export_scale(amax, maxbound: float) -> jax.Array:
    """``amax / maxbound`` in float32 after ModelOpt's ``export_amax``: a zero amax becomes ``maxbound`` (scale
    1.0) and amax is clamped to ``[tiny, max]`` of float32. Shared by the FP8 and INT8 exports (traceable)."""
    amax = _f32(amax)
    f32 = jnp.finfo(jnp.float32)
    amax = jnp.clip(jnp.where(amax == 0, jnp.float32(maxbound), amax), f32.tiny, f32.max)
    return div(amax, maxbound)


@jax.jit
def quantize(x: jax.Array, amax) -> tuple[jax.Array, jax.Array]:
    """Real FP8 quantization for export: ``(q float8_e4m3fn [x.shape], scale float32 [amax.shape])``.

    ``q = e4m3(f32(x) / scale)`` with ``scale = scale_from_amax(amax)``, a true division, as
    ModelOpt's ``to_quantized_weight``. With a per-tensor (0-d) ``amax`` the quotient is first
    rounded to ``x.dtype``: ModelOpt divides the weight in the export dtype by a 0-d float32 scale,
    and torch's type promotion keeps the bfloat16/float16 result (a double rounding). A per-channel or
    per-expert ``amax`` (any non-0-d shape) divides in float32 like ModelOpt's ``scale[:, None]``.
    Values beyond +-448 after scaling (only if ``amax`` is below max|x|) saturate to +-448, as
    torch's cast does.
    """
    scale = scale_from_amax(amax)
    scaled = div(x.astype(jnp.float32), scale)
    if scale.ndim == 0:
        scaled = round_to_dtype(scaled, x.dtype)
    q = to_e4m3(jnp.clip(scaled, -E4M3_MAX, E4M3_MAX))
    return q, scale


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(q: jax.Array, scale, dtype=jnp.float32) -> jax.Array:
    """``q.astype(dtype) * scale.astype(dtype)`` (ModelOpt ``FP8QTensor.dequantize``).

    The product of two values of ``dtype`` is exact in float32, so it is formed there and rounded
    once to ``dtype``, which is what torch's bfloat16/float16 multiply does.
    """
    return (decode_e4m3(q) * round_to_dtype(jnp.asarray(scale, jnp.float32), dtype)).astype(dtype)


#: Integer-only E4M3 rounding to float32 values (a fallback for backends without an FP8 convert).
e4m3_round_arith = jax.jit(_round_e4m3_bits)
