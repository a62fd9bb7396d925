"""Activation smoothing shared by SmoothQuant and AWQ: which linears take part, the statistics they collect in the
calibration forward, and ModelOpt's ``apply_pre_quant_scale_and_smooth`` on jaxquant's quantizers.

Smoothing a linear by a per-input-channel factor ``p`` computes ``(x * p) @ (W / p).T``, the same product. jaxquant
keeps both halves on the quantizers instead of rewriting the weight: the input quantizer's ``pre_quant_scale`` holds
``p`` rounded to the model dtype (ModelOpt's ``input_quantizer._pre_quant_scale``), the weight quantizer's holds
``1 / p`` in float32, so the quantized weight is ``round_dtype(W * (1 / p))`` exactly as ModelOpt's folded weight.
Both are calibration state (``<quantizer>._pre_quant_scale``); the exporter writes the folded weight.

Statistics are collected by *calibrators* attached to the input quantizer (``TensorQuantizer.calibrator``): modules
whose state variables subclass ``QuantAmax``, so the jitted calibration step (whole model, stage by stage or layer
by layer) carries them like any amax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.calibration.sites import Site
from jaxquant.errors import UnsupportedError
from jaxquant.quantizer.tensor_quantizer import QuantAmax, TensorQuantizer, _mask_like


class SmoothingStat(QuantAmax):
    """A statistic an algorithm's calibrator collects (float32); a ``QuantAmax`` so calibration steps carry it."""


@dataclasses.dataclass(eq=False)
class SmoothLinear:
    """One linear that an activation-smoothing algorithm works on."""

    name: str  # ModelOpt module name
    linear: Any  # the owning module (jaxquant ``Linear``)
    wq: TensorQuantizer
    iq: TensorQuantizer

    @property
    def weight(self) -> jax.Array:
        return self.linear.weight[...]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[-1])


def smooth_linears(sites: list[Site], what: str) -> list[SmoothLinear]:
    """Every linear with an enabled weight quantizer, in model order (ModelOpt's ``is_quantized_linear`` with an
    enabled weight quantizer), with any pre_quant_scale (and SVDQuant factors) of an earlier run cleared.

    Raises:
      UnsupportedError: stacked MoE experts or a linear without an input quantizer (``what`` names the algorithm).
    """
    out = []
    for s in sites:
        if not s.is_gemm_weight or not s.quantizer.enabled:
            continue
        if s.stacked:
            raise UnsupportedError(f"{what} on stacked MoE experts ({s.path}) is not implemented yet.")
        iq = getattr(s.parent, "input_quantizer", None)
        if not isinstance(iq, TensorQuantizer) or not callable(getattr(s.parent, "matmul", None)):
            raise UnsupportedError(f"{what}: {s.path} is not a jaxquant Linear (it needs an input quantizer and "
                                   "matmul()); calibrate this model with max.")
        out.append(SmoothLinear(s.module_names[0], s.parent, s.quantizer, iq))
    for lin in out:  # smoothing starts from the source weights: a previous run's scales / SVDQuant factors go
        lin.iq.set_pre_quant_scale(None)
        lin.wq.set_pre_quant_scale(None)
        lin.wq.set_lowrank(None, None)
    return out


def masked_abs(x: jax.Array, token_mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """``(|x|`` in float32 with masked positions 0, the mask broadcast to ``x``)``."""
    a = jnp.abs(x.astype(jnp.float32))
    m = _mask_like(token_mask, a)
    return (a if m is None else jnp.where(m, a, 0.0)), m


class ChannelMax(nnx.Module):
    """Per-input-channel ``max |x|`` over every real token (SmoothQuant's per-channel activation amax)."""

    def __init__(self, channels: int):
        self.amax = SmoothingStat(jnp.zeros((channels,), jnp.float32))

    def collect(self, x: jax.Array, token_mask: jax.Array | None) -> None:
        a, _ = masked_abs(x, token_mask)
        self.amax.value = jnp.maximum(self.amax.value, jnp.max(a.reshape(-1, a.shape[-1]), axis=0))


def power(x: np.ndarray, e: float) -> np.ndarray:
    """``x ** e`` of a float32 vector, rounded to float32 (torch's ``pow``: 1 for ``e == 0``, ``x`` for 1; else
    computed in float64 and rounded once, which can differ from torch's vectorised float32 pow in the last bit)."""
    x = np.asarray(x, np.float32)
    if e == 0:
        return np.ones_like(x)
    if e == 1:
        return x.copy()
    return (x.astype(np.float64) ** np.float64(np.float32(e))).astype(np.float32)


def round_to(x, dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float32 (torch's ``.to(dtype)`` of a float32 tensor)."""
    return np.asarray(jnp.asarray(np.asarray(x, np.float32)).astype(dtype).astype(jnp.float32))


def apply_smoothing(lin: SmoothLinear, pre_quant_scale: np.ndarray, act_amax: np.ndarray | None) -> None:
    """ModelOpt's ``apply_pre_quant_scale_and_smooth(linear, pre_quant_scale)`` on jaxquant's quantizers.

    The input quantizer's pre-quantization scale becomes ``pre_quant_scale`` rounded to the weight dtype, the weight
    quantizer's ``1 / pre_quant_scale`` (float32) and its amax is recalibrated from the smoothed weight. With
    ``act_amax`` (the per-channel input amax; None when the input is not statically quantized) the input amax becomes
    ``max(round_dtype(act_amax) * pre_quant_scale)`` rounded to the weight dtype.

    Args:
      pre_quant_scale: float32 ``[in]``, all positive.
    """
    p = np.asarray(pre_quant_scale, np.float32)
    if not np.all(p > 0):
        raise ValueError(f"{lin.name}: the pre_quant_scale must be positive")
    dtype = lin.weight.dtype
    lin.iq.set_pre_quant_scale(round_to(p, dtype))
    lin.wq.set_pre_quant_scale(np.float32(1.0) / p)
    lin.wq.calibrate_weight(lin.weight)
    if act_amax is not None and lin.iq.enabled and lin.iq.amax is not None and lin.iq.config.needs_calibration:
        top = np.max(round_to(act_amax, dtype) * p)
        lin.iq.amax.value = jnp.asarray(round_to(top, dtype)).reshape(lin.iq.amax.value.shape)


def arange_like_torch(stop: float, step: float) -> list[float]:
    """``torch.arange(0, stop, step)`` of float32 values as Python floats (ModelOpt's AWQ alpha grid)."""
    n = math.ceil(np.float32(stop) / np.float32(step))  # in float32, as torch sizes a float32 range
    return [float(np.float32(i * step)) for i in range(n)]


__all__ = ["ChannelMax", "SmoothLinear", "SmoothingStat", "apply_smoothing", "arange_like_torch", "masked_abs",
           "power", "round_to", "smooth_linears"]
