"""Fake quantization with ModelOpt's straight-through gradients, and an optional learnable amax.

``fake_quant(fmt, block_size, x, amax, global_amax, pass_through=True)`` returns exactly what
``TensorQuantizer`` computes in ``fake_quant`` mode (the forward value *is*
``jaxquant.quantizer.fake_quant_ste``, i.e. the bit-exact numerics of ``jaxquant.numerics``); only
the derivatives are defined here.

Gradient w.r.t. ``x`` (ModelOpt ``tensor_quant.py``, ``_fake_quant_backward_function``):

* ``pass_through=True`` (ModelOpt's default ``pass_through_bwd: true``): the identity everywhere,
  including values beyond the representable range that the forward pass clips. ModelOpt saves
  nothing for the backward pass and returns ``grad_outputs`` unchanged.
* ``pass_through=False`` (``pass_through_bwd: false``): the identity where ``|x| <= amax`` and zero
  outside (ModelOpt's ``torch.where(inputs.abs() <= amax, grad_outputs, 0)``), "STE with zeroed
  outlier gradients". ``amax`` is the per-element threshold: the per-tensor (or per-channel) amax
  for FP8, the global amax for dynamic NVFP4, each block's amax for static NVFP4.

Gradient w.r.t. ``amax`` (used only when ``amax`` is differentiated, i.e. a learnable amax; a
``QuantAmax`` that is not in the optimizer's ``wrt`` never gets one, and costs nothing thanks to
symbolic zeros): LSQ's estimator (Esser et al., 2019), which is ModelOpt's ``lsq`` with tied
pre/post amax written per element::

    d y / d amax = (y - x) / amax    where |x| <= amax   (rounding error, through the scale)
                 = sign(x)           where |x| >  amax   (the clipped value is +-amax)

It follows from ``y = s * round(x / s)`` with a straight-through ``round`` and a scale ``s``
proportional to ``amax`` (for NVFP4, each block's E4M3 scale code is locally constant in the
global amax, so the same formula holds). Without LSQ's gradient-scale factor ``1/sqrt(N * Qmax)``:
use a smaller learning rate for amax (see docs/qat.md). ``global_amax`` (static NVFP4) never gets
a gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.formats.registry import quantizer_format
from jaxquant.quantizer.tensor_quantizer import fake_quant_ste

_SymbolicZero = jax.custom_derivatives.SymbolicZero


def amax_per_element(fmt: str, block_size: int, amax, shape: tuple[int, ...]) -> jax.Array:
    """The amax that bounds each element of a tensor of ``shape`` (float32, broadcastable to it).

    Static NVFP4 stores one amax per block of the last axis (``[..., ceil(K/bs)]``); it is
    repeated over its block. Every other format's amax already broadcasts
    (``QuantizerFormat.amax_per_element``).
    """
    return quantizer_format(fmt).amax_per_element(amax, shape, block_size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 5))
def fake_quant(fmt: str, block_size: int, x, amax, global_amax=None, pass_through: bool = True):
    """Quantize-dequantize ``x`` (bit-exact with ModelOpt) with the gradients of the module doc.

    Args:
      fmt: ``QuantizerConfig.format`` ("fp8", "fp8_per_channel", "nvfp4", "nvfp4_static").
      block_size: NVFP4 block size (ignored by FP8).
      x: the tensor, any float dtype.
      amax: the quantizer's amax (shape as ``TensorQuantizer.amax``).
      global_amax: the global amax of static NVFP4, else None.
      pass_through: ModelOpt's ``pass_through_bwd``.
    """
    return fake_quant_ste(fmt, block_size, x, amax, global_amax)


def _is_zero(t) -> bool:
    return t is None or isinstance(t, _SymbolicZero)


@functools.partial(fake_quant.defjvp, symbolic_zeros=True)
def _fake_quant_jvp(fmt, block_size, pass_through, primals, tangents):
    x, amax, global_amax = primals
    tx, tamax, _ = tangents
    y = fake_quant_ste(fmt, block_size, x, amax, global_amax)
    if _is_zero(tx) and _is_zero(tamax):
        return y, jnp.zeros_like(y)
    a = None if (pass_through and _is_zero(tamax)) else amax_per_element(fmt, block_size, amax, x.shape)
    inside = None if a is None else jnp.abs(x.astype(jnp.float32)) <= a
    out = jnp.zeros(y.shape, jnp.float32)
    if not _is_zero(tx):
        tx = tx.astype(jnp.float32)
        out = out + (tx if pass_through else jnp.where(inside, tx, 0.0))
    if not _is_zero(tamax):
        xf, yf = x.astype(jnp.float32), y.astype(jnp.float32)
        safe = jnp.where(a > 0, a, jnp.float32(1.0))
        slope = jnp.where(inside, (yf - xf) / safe, jnp.sign(xf))
        ta = amax_per_element(fmt, block_size, tamax, x.shape)
        out = out + slope * ta
    return y, out.astype(y.dtype)


__all__ = ["amax_per_element", "fake_quant"]
