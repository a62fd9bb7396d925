"""INT8 weights, one scale per output channel, activations unquantized (ModelOpt ``int8_wo``, ``quant_algo`` W8A16;
hf_ptq ``--qformat int8_wo``).

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
    ElementwiseQuantizer,
    PerChannelAmax,
    TensorSpec,
    WeightOnlyFormat,
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
        if input is not None:
            raise UnsupportedError(
                f"INT8 weights with {input.format} activations (SmoothQuant W8A8, INT8_SQ) are not supported yet; "
                "the INT8 format jaxquant exports is weight-only (W8A16): disable the input quantizers.")
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        return [("weight", (out, in_), I8), ("weight_scale", (out,), F32)]

    def config_group(self, group_size=None) -> dict:
        return {"weights": {"dynamic": False, "num_bits": 8, "type": "int", "strategy": "channel"}}


# ----------------------------------------------------------------------------------------------- quantizers
class INT8Quantizer(ElementwiseQuantizer):
    """A ``TensorQuantizer`` with signed INT8 and one amax per tensor (``QuantizerConfig.format`` ``int8``)."""

    name = "int8"
    kernel = int8_num.fake_quant


class INT8PerChannelQuantizer(PerChannelAmax, INT8Quantizer):
    """Signed INT8 with one amax per channel along ``config.axis`` (``int8_per_channel``)."""

    name = "int8_per_channel"
