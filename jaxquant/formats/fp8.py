"""FP8 E4M3 weights: per tensor (``fp8``, W8A8 with a static ``input_scale``) and per output channel
(``fp8_pc_pt``, FP8_PER_CHANNEL_PER_TOKEN: activations quantized dynamically per token, no
``input_scale``). Also the KV-cache scale (``k_scale`` / ``v_scale`` = amax / 448).

Tensors (docs/export.md): ``weight`` F8_E4M3 ``[out, in]`` = ``e4m3(w / weight_scale)``;
``weight_scale`` F32 ``[]`` (per tensor) or ``[out]`` (per channel) = ``amax / 448``;
``input_scale`` F32 ``[]`` = ``amax / 448``. A zero amax becomes 448 (scale 1.0).

The numerics are ``jaxquant.numerics.fp8`` (``quantize``, ``scale_from_amax``, ``dequantize``).
ModelOpt divides in the export dtype: ``weight.to(dtype) / weight_scale``; with a 0-d scale a
bfloat16 quotient is rounded to bfloat16 before the E4M3 cast, with a per-channel scale (a
dimensioned float32 tensor) it stays float32 (``numerics.fp8.quantize`` follows both rules).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.errors import UnsupportedError
from jaxquant.formats.base import (
    F8,
    F32,
    DeferredCheck,
    FormatBase,
    ElementwiseQuantizer,
    PerChannelAmax,
    TensorSpec,
    check_amax,
    finite_stats,
)
from jaxquant.numerics import fp8 as fp8_num

_FP8_GROUP = {"dynamic": False, "num_bits": 8, "type": "float"}


@functools.partial(jax.jit, static_argnames=("compute_dtype", "per_channel"))
def _export(w, amax, in_amax, *, compute_dtype, per_channel: bool):
    stats = {"w": finite_stats(w), "amax": finite_stats(amax)}
    a = jnp.asarray(amax, jnp.float32)
    a = a.reshape(-1, 1) if per_channel else a.reshape(())
    q, scale = fp8_num.quantize(w.astype(compute_dtype), a)
    out = {"weight": q, "weight_scale": scale.reshape(-1) if per_channel else scale}
    if in_amax is not None:
        stats["in"] = finite_stats(in_amax)
        out["input_scale"] = fp8_num.scale_from_amax(in_amax).reshape(())
    return out, stats


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q, scale, dtype):
    s = jnp.asarray(scale, jnp.float32)
    if s.ndim == 1:  # per output channel
        s = s[:, None]
    # float32 product rounded once to ``dtype``: what fake quant computes (``e4m3 * scale_inv``)
    return fp8_num.dequantize(q, s, jnp.float32).astype(dtype)


def kv_scale(amax) -> jax.Array:
    """``k_scale`` / ``v_scale`` = amax / 448 (float32; FP8 and NVFP4 KV caches alike; 0 -> 1.0).

    ``amax`` must be finite and >= 0 (checked by the caller with ``check_amax``)."""
    return fp8_num.scale_from_amax(amax)


class FP8Activations:
    """Static per-tensor FP8 activations, the mixin of every format with a calibrated FP8 ``input_scale``
    (``amax / 448``; the loader fake-quantizes the inputs with FP8): FP8, W4A8 NVFP4 / MXFP4 + FP8, W4A8_AWQ."""

    def input_scale(self, amax, what: str = "input amax") -> jax.Array:
        check_amax(amax, what)
        return fp8_num.scale_from_amax(jnp.asarray(amax, jnp.float32))

    def activation_config(self):
        from jaxquant.quantizer.config import QuantizerConfig

        return QuantizerConfig(num_bits=(4, 3))


class FP8(FP8Activations, FormatBase):
    """FP8 per-tensor weights (ModelOpt ``fp8``, ``quant_algo`` FP8)."""

    name = "fp8"
    quant_algo = "FP8"
    weight_config_formats = ("fp8",)
    static_input_scale = True
    sidecar_weight_amax = True
    input_divisor = fp8_num.E4M3_MAX

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats:
            return False
        inf = input.format if input is not None else None
        if inf not in (None, "fp8"):
            raise UnsupportedError(
                f"FP8 weights with {inf} activations cannot be exported as a ModelOpt checkpoint "
                "(serving engines expect FP8 activations or none)."
            )
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        specs = [("weight", (out, in_), F8), ("weight_scale", (out,) if self.per_channel else (), F32)]
        if input_scale:
            specs.append(("input_scale", (), F32))
        return specs

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        w = jnp.asarray(weight)
        cd = jnp.dtype(compute_dtype) if compute_dtype is not None else w.dtype
        amax = jnp.asarray(w_amax, jnp.float32)
        ia = None if in_amax is None else jnp.asarray(in_amax, jnp.float32)
        out, stats = _export(w, amax, ia, compute_dtype=cd, per_channel=self.per_channel)
        return out, DeferredCheck(stats, what, w, amax, None, ia)

    def dequantize(self, tensors, dtype=jnp.float32) -> jax.Array:
        return _dequantize(jnp.asarray(tensors["weight"]), jnp.asarray(tensors["weight_scale"]), jnp.dtype(dtype))

    def config_group(self, group_size=None) -> dict:
        return {"input_activations": dict(_FP8_GROUP), "weights": dict(_FP8_GROUP)}


class FP8PerChannel(FP8):
    """FP8 weights with one scale per output channel (ModelOpt ``fp8_pc_pt``,
    ``quant_algo`` FP8_PER_CHANNEL_PER_TOKEN); activations dynamic per token (no ``input_scale``)."""

    name = "fp8_pc_pt"
    quant_algo = "FP8_PER_CHANNEL_PER_TOKEN"
    weight_config_formats = ("fp8_per_channel",)
    static_input_scale = False
    per_channel = True
    sidecar_weight_amax = False
    config_groups_when_uniform = False  # ModelOpt writes no config_groups for a uniform FP8_PC_PT export

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats:
            return False
        if weight.axis not in (0, -2) and weight.axis != (0,):
            raise UnsupportedError(
                f"FP8 per-channel weights along axis {weight.axis} cannot be exported; ModelOpt's "
                "FP8_PER_CHANNEL_PER_TOKEN wants one scale per output channel (axis 0)."
            )
        if input is not None and not input.is_dynamic:
            raise UnsupportedError(
                "FP8 per-channel weights export as FP8_PER_CHANNEL_PER_TOKEN, whose activations are "
                "quantized dynamically per token; a static activation quantizer cannot be exported "
                "with them. Use `type: dynamic` on the input quantizer or per-tensor FP8 weights."
            )
        return True

    def config_group(self, group_size=None) -> dict:
        return {"input_activations": dict(_FP8_GROUP), "weights": {**_FP8_GROUP, "strategy": "channel"}}


# ----------------------------------------------------------------------------------------------- quantizers
class FP8Quantizer(ElementwiseQuantizer):
    """A ``TensorQuantizer`` with FP8 E4M3 and one amax per tensor (``QuantizerConfig.format`` ``fp8``)."""

    name = "fp8"
    kernel = fp8_num.fake_quant


class FP8PerChannelQuantizer(PerChannelAmax, FP8Quantizer):
    """FP8 E4M3 with one amax per channel along ``config.axis`` (``fp8_per_channel``)."""

    name = "fp8_per_channel"


class FP8PerTokenQuantizer(FP8Quantizer):
    """FP8 E4M3 activations quantized dynamically per token (``fp8_per_token``: ``block_sizes {-1: None}``,
    ``type: dynamic``; the input side of FP8_PER_CHANNEL_PER_TOKEN): each row's amax is ``max|x|`` over the last
    axis, computed at every call, then FP8 fake quant. Nothing is calibrated."""

    name = "fp8_per_token"

    def fake_quant(self, x, amax, global_amax, block_size):
        row_amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return fp8_num.fake_quant(x, row_amax)
