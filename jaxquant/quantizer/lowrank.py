"""SVDQuant's low-rank branch on a weight quantizer (ModelOpt's ``SVDQuantTensorQuantizer`` /
``SVDQuantLinear``), as explicit NNX state.

A weight quantizer may hold two factors of the smoothed weight ``W_s`` (the weight after its ``pre_quant_scale``):
``svdquant_lora_a`` ``[r, in]`` and ``svdquant_lora_b`` ``[out, r]`` (ModelOpt's attribute names), float32 arrays
holding values of the model dtype. With them the quantizer quantizes the residual
``R = round_dtype(W_s - round_dtype(lora_b @ lora_a))`` (ModelOpt subtracts the product from the weight in place; the
product is a model-dtype GEMM, here accumulated in float32 at full precision and rounded once), and the owning linear
adds the unquantized branch ``(x_s @ lora_a^T) @ lora_b^T`` to its output, ``x_s`` its input after the input
quantizer's ``pre_quant_scale`` and before quantization:

    y = Q_out(Q_in(x_s) @ Q_w(R)^T + bias) + (x_s @ lora_a^T) @ lora_b^T

The factors are set by ``calibration/svdquant.py``; they travel in the calibration state
(``<weight quantizer>._svdquant_lora_a`` / ``_svdquant_lora_b``) and in orbax checkpoints. The roundings pass
gradients straight through, so QAT trains the weight through the residual (and the factors, when the optimizer's
``wrt`` includes ``QuantLowRank``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.numerics._exact import round_to_dtype


class QuantLowRank(nnx.Variable):
    """One SVDQuant factor of a weight quantizer (``svdquant_lora_a`` ``[r, in]`` or ``svdquant_lora_b``
    ``[out, r]``); float32 holding values of the model dtype."""


def _round_ste(x: jax.Array, dtype) -> jax.Array:
    """float32 ``x`` rounded to ``dtype`` (``round_to_dtype``: XLA cannot skip it), as float32, with the identity as
    its derivative (the read-back from the bits has none): ``x + stop_gradient(round(x) - x)``, whose value is the
    rounded one exactly (the rounding error of ``x`` is a float32 number)."""
    return x + jax.lax.stop_gradient(round_to_dtype(x, dtype) - x)


def lowrank_product(lora_a: jax.Array, lora_b: jax.Array, dtype) -> jax.Array:
    """``round_dtype(lora_b @ lora_a)`` (``[out, in]`` in ``dtype``): the factors in ``dtype``, their products summed
    in float32 at full precision, rounded once."""
    a = jnp.asarray(lora_a).astype(dtype)
    b = jnp.asarray(lora_b).astype(dtype)
    p = jax.lax.dot_general(b, a, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    return _round_ste(p, dtype).astype(dtype)


def lowrank_residual(w: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """``round_dtype(w - lowrank_product)``: the weight the quantizer sees (``w`` ``[out, in]``, its dtype)."""
    p = lowrank_product(lora_a, lora_b, w.dtype)
    return _round_ste(w.astype(jnp.float32) - p.astype(jnp.float32), w.dtype).astype(w.dtype)


def lowrank_branch(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, precision=None) -> jax.Array:
    """``(x @ lora_a^T) @ lora_b^T`` in ``x``'s dtype (ModelOpt's two ``F.linear`` calls); ``x`` ``[..., in]``."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    h = jax.lax.dot_general(x, jnp.asarray(lora_a).astype(x.dtype), dims, precision=precision)
    return jax.lax.dot_general(h, jnp.asarray(lora_b).astype(x.dtype), dims, precision=precision)


__all__ = ["QuantLowRank", "lowrank_branch", "lowrank_product", "lowrank_residual"]
