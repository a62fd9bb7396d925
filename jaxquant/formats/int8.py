"""INT8 weights, one scale per output channel: activations unquantized (ModelOpt ``int8_wo``, ``quant_algo`` W8A16;
hf_ptq ``--qformat int8_weight_only``) or static per-tensor INT8 (``int8_sq``, W8A8_SQ_PER_CHANNEL; ``--qformat int8``).

Tensors (docs/export.md): ``weight`` I8 ``[out, in]`` = ``clip(round_half_even(w / weight_scale), -128, 127)``;
``weight_scale`` F32 ``[out]`` = ``amax / 127`` (a zero channel gets 1.0). No ``input_scale``. ModelOpt writes no
``config_groups`` for a uniform W8A16 export, and unifies no scales between fused siblings (the amax is per
channel). The numerics are ``jaxquant.numerics.int8``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import UnsupportedError
from jaxquant.formats.base import (
    F32,
    DeferredCheck,
    ElementwiseQuantizer,
    FormatBase,
    PerChannelAmax,
    TensorSpec,
    WeightOnlyFormat,
    check_amax,
    finite_stats,
)
from jaxquant.numerics import int8 as int8_num

I8 = np.dtype(np.int8)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _export(w, amax, *, compute_dtype):
    stats = {"w": finite_stats(w), "amax": finite_stats(amax)}
    q, scale = int8_num.quantize(w.astype(compute_dtype), jnp.asarray(amax, jnp.float32).reshape(-1, 1))
    return {"weight": q, "weight_scale": scale.reshape(-1)}, stats


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q, scale, dtype):
    return int8_num.dequantize(q, jnp.asarray(scale, jnp.float32)[:, None], jnp.float32).astype(dtype)


class INT8WeightOnly(WeightOnlyFormat):
    """INT8 per-channel weights, unquantized activations (ModelOpt ``int8_wo``, ``quant_algo`` W8A16)."""

    name = "int8_wo"
    kernel = _export
    dequantizer = _dequantize
    quant_algo = "W8A16"
    weight_config_formats = ("int8_per_channel",)
    per_channel = True
    config_groups_when_uniform = False  # ModelOpt writes none for a uniform W8A16 export
    input_divisor = int8_num.INT8_MAX

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats:
            return False
        if weight.axis not in (0, -2) and weight.axis != (0,):
            raise UnsupportedError(f"INT8 per-channel weights along axis {weight.axis} cannot be exported; "
                                   "ModelOpt's W8A16 wants one scale per output channel (axis 0).")
        return input is None  # with INT8 activations: INT8W8A8

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        return [("weight", (out, in_), I8), ("weight_scale", (out,), F32)]

    def config_group(self, group_size=None) -> dict:
        return {"weights": {"dynamic": False, "num_bits": 8, "type": "int", "strategy": "channel"}}


class INT8W8A8(FormatBase):
    """INT8 per-channel weights with static per-tensor INT8 activations (ModelOpt ``int8_sq``, ``quant_algo``
    W8A8_SQ_PER_CHANNEL; hf_ptq ``--qformat int8``; TensorRT-LLM serves it). ``input_scale`` F32 ``[]`` =
    ``amax / 127``. Fused siblings share one ``input_scale`` (ModelOpt's export unifies a one-element input amax);
    the per-channel weight scales stay their own. SmoothQuant (``int8_smoothquant``) adds ``pre_quant_scale``
    (``export/prequant.py``)."""

    name = "int8_sq"
    pqs_format = "int8_sq"
    quant_algo = "W8A8_SQ_PER_CHANNEL"
    weight_config_formats = ("int8_per_channel",)
    static_input_scale = True
    shares_fused_scales = True
    per_channel = True
    config_groups_when_uniform = False  # ModelOpt writes none for W8A8_SQ_PER_CHANNEL
    input_divisor = int8_num.INT8_MAX

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats or input is None:
            return False
        if weight.axis not in (0, -2) and weight.axis != (0,):
            raise UnsupportedError(f"INT8 per-channel weights along axis {weight.axis} cannot be exported; "
                                   "ModelOpt's W8A8 wants one scale per output channel (axis 0).")
        if input.format != "int8":
            raise UnsupportedError(f"INT8 weights with {input.format} activations cannot be exported; W8A8 "
                                   "(W8A8_SQ_PER_CHANNEL) wants static per-tensor INT8 activations, W8A16 none.")
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        specs = [("weight", (out, in_), I8), ("weight_scale", (out,), F32)]
        return specs + [("input_scale", (), F32)] if input_scale else specs

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        w = jnp.asarray(weight)
        cd = jnp.dtype(compute_dtype) if compute_dtype is not None else w.dtype
        amax = jnp.asarray(w_amax, jnp.float32)
        out, stats = _export(w, amax, compute_dtype=cd)
        ia = None
        if in_amax is not None:
            ia = jnp.asarray(in_amax, jnp.float32)
            out["input_scale"], stats["in"] = _input_scale(ia)
        return out, DeferredCheck(stats, what, w, amax, None, ia)

    def input_scale(self, amax, what: str = "input amax") -> jax.Array:
        check_amax(amax, what)
        return int8_num.scale_from_amax(jnp.asarray(amax, jnp.float32))

    def activation_config(self):
        from jaxquant.quantizer.config import QuantizerConfig

        return QuantizerConfig(num_bits=8)

    def dequantize(self, tensors, dtype=jnp.float32) -> jax.Array:
        return _dequantize(jnp.asarray(tensors["weight"]), jnp.asarray(tensors["weight_scale"], jnp.float32),
                           jnp.dtype(dtype))

    def config_group(self, group_size=None) -> dict:
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "int"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "int", "strategy": "channel"}}


@jax.jit
def _input_scale(in_amax):
    return int8_num.scale_from_amax(in_amax).reshape(()), finite_stats(in_amax)


# ----------------------------------------------------------------------------------------------- quantizers
class INT8Quantizer(ElementwiseQuantizer):
    """A ``TensorQuantizer`` with signed INT8 and one amax per tensor (``QuantizerConfig.format`` ``int8``)."""

    name = "int8"
    kernel = int8_num.fake_quant


class INT8PerChannelQuantizer(PerChannelAmax, INT8Quantizer):
    """Signed INT8 with one amax per channel along ``config.axis`` (``int8_per_channel``)."""

    name = "int8_per_channel"
