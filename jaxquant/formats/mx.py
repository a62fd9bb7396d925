"""The MX formats (E8M0 power-of-two scales per block of 32 inputs): MXFP8, MXFP4, and MXFP4 weights with FP8
activations (W4A8_MXFP4_FP8). The numerics are ``jaxquant.numerics.mx``.

MXFP8: E4M3 weights and activations in blocks of 32 along the input features, each block with a power-of-two
scale stored as an E8M0 byte (ModelOpt ``mxfp8``, ``quant_algo`` MXFP8; hf_ptq ``--qformat mxfp8``; vLLM serves
it from compute capability 8.0).

Both quantizers are dynamic: the block scales are computed from the tensor at every call and nothing is
calibrated, so a checkpoint has no ``input_scale`` and engines quantize activations the same way at run time.

Tensors (docs/export.md): ``weight`` F8_E4M3 ``[out, in]`` = ``e4m3(clamp(w * 2^-e, -448, 448))``;
``weight_scale`` U8 ``[out, in/32]`` = ``e + 127`` with ``e = clamp(ceil(log2(block amax / 448)), -127, 127)``.
``hf_quant_config.json``: ``{"quant_algo": "MXFP8", "group_size": 32}``; ModelOpt writes no ``config_groups``
into ``config.json``.

MXFP4 (``--qformat mxfp4`` / ``mxfp4_mlp_weight_only``): ``weight`` U8 ``[out, in/2]`` (two E2M1 codes, the
even input in the low nibble) and ``weight_scale`` U8 ``[out, in/32]``; ModelOpt writes ``quant_algo`` in lower
case, ``"mxfp4"``, without ``group_size``, whatever the activations (dynamic MXFP4 or none). With static FP8
activations (``--qformat w4a8_mxfp4_fp8``) it is W4A8_MXFP4_FP8 (``group_size`` 32, ``input_scale`` = amax / 448;
TensorRT-LLM).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.errors import ExportError, UnsupportedError
from jaxquant.formats.base import (
    F8,
    F32,
    U8,
    DeferredCheck,
    FormatBase,
    PerTensorAmax,
    TensorSpec,
    finite_stats,
)
from jaxquant.numerics import fp8 as fp8_num
from jaxquant.numerics import mx, mx_kernel
from jaxquant.formats.fp8 import FP8Activations


@functools.partial(jax.jit, static_argnames=("compute_dtype", "fp4"))
def _export(w, amax, in_amax, *, compute_dtype, fp4: bool):
    q, scale = (mx.quantize_fp4 if fp4 else mx.quantize)(w, compute_dtype=compute_dtype)
    out, stats = {"weight": q, "weight_scale": scale}, {"w": finite_stats(w), "amax": finite_stats(amax)}
    if in_amax is not None:  # static FP8 activations (W4A8_MXFP4_FP8)
        out["input_scale"] = fp8_num.scale_from_amax(in_amax).reshape(())
        stats["in"] = finite_stats(in_amax)
    return out, stats


def _mx_config(num_bits=(4, 3)):
    from jaxquant.quantizer.config import E8M0, BlockSizes, QuantizerConfig

    return QuantizerConfig(num_bits=num_bits, block_sizes=BlockSizes(size=mx.BLOCK, type="dynamic", scale_bits=E8M0))


class MXFP8(FormatBase):
    """MXFP8 weights (E4M3, E8M0 scales per 32 inputs) with dynamic MXFP8 activations (ModelOpt ``mxfp8``)."""

    name = "mxfp8"
    quant_algo = "MXFP8"
    block_size = mx.BLOCK
    weight_config_formats = ("mxfp8",)
    config_groups_when_uniform = False  # ModelOpt 0.47 writes no config_groups for MXFP8

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats:
            return False
        if weight.block_sizes.size != mx.BLOCK:
            raise UnsupportedError(f"MXFP8 weights in blocks of {weight.block_sizes.size} cannot be exported; "
                                   f"MXFP8 checkpoints use blocks of {mx.BLOCK}.")
        if input is not None and input.format != "mxfp8":
            raise UnsupportedError(f"MXFP8 weights with {input.format} activations cannot be exported: an MXFP8 "
                                   "checkpoint quantizes activations to MXFP8 at run time. Give the input "
                                   "quantizers the MXFP8 config too (or disable them).")
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        return [("weight", (out, in_), F8), ("weight_scale", (out, in_ // mx.BLOCK), U8)]

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        w = jnp.asarray(weight)
        label = "MXFP4" if self.elements_per_byte == 2 else "MXFP8"
        if w.shape[-1] % mx.BLOCK:
            raise ExportError(f"{what}: input dimension {w.shape[-1]} is not a multiple of the {label} block size "
                              f"{mx.BLOCK}; exclude this layer from {label} in the recipe.")
        cd = jnp.dtype(compute_dtype) if compute_dtype is not None else w.dtype
        amax = jnp.asarray(0.0 if w_amax is None else w_amax, jnp.float32)  # the recorded max|w| (unused): checked
        ia = None if in_amax is None else jnp.asarray(in_amax, jnp.float32)
        out, stats = _export(w, amax, ia, compute_dtype=cd, fp4=self.elements_per_byte == 2)
        return out, DeferredCheck(stats, what, w, amax, None, ia)

    def input_scale(self, amax, what: str = "input amax") -> jax.Array:
        raise UnsupportedError(f"{what}: MXFP8 quantizes activations dynamically; it has no input_scale.")

    def activation_config(self):
        return _mx_config()

    def dynamic_activation_config(self):
        return _mx_config()

    def dequantize(self, tensors, dtype=jnp.float32) -> jax.Array:
        return mx.dequantize(jnp.asarray(tensors["weight"]), jnp.asarray(tensors["weight_scale"]), jnp.dtype(dtype))

    def config_group(self, group_size=None) -> dict:
        gs = group_size or mx.BLOCK
        group = {"dynamic": False, "num_bits": 8, "type": "float", "group_size": gs}
        return {"input_activations": dict(group), "weights": dict(group)}


class MXFP4(MXFP8):
    """MXFP4 weights (E2M1, E8M0 scales per 32 inputs), activations dynamic MXFP4 or unquantized (``mxfp4``)."""

    name = "mxfp4"
    quant_algo = "mxfp4"  # ModelOpt 0.47 writes the lower-case format name, with no group_size
    weight_config_formats = ("mxfp4",)
    elements_per_byte = 2

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats:
            return False
        if weight.block_sizes.size != mx.BLOCK:
            raise UnsupportedError(f"MXFP4 weights in blocks of {weight.block_sizes.size} cannot be exported; "
                                   f"MXFP4 checkpoints use blocks of {mx.BLOCK}.")
        if input is not None and input.format not in ("mxfp4", "fp8"):
            raise UnsupportedError(f"MXFP4 weights with {input.format} activations cannot be exported: MXFP4 wants "
                                   "dynamic MXFP4 activations or none, W4A8_MXFP4_FP8 static FP8 ones.")
        return input is None or input.format == "mxfp4"

    def hf_layer_entry(self, block: int) -> dict:
        return {"quant_algo": self.quant_algo}

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        specs = [("weight", (out, in_ // 2), U8), ("weight_scale", (out, in_ // mx.BLOCK), U8)]
        return specs + [("input_scale", (), F32)] if input_scale else specs

    def activation_config(self):
        return _mx_config(num_bits=(2, 1))

    def dynamic_activation_config(self):
        return _mx_config(num_bits=(2, 1))

    def dequantize(self, tensors, dtype=jnp.float32) -> jax.Array:
        return mx.dequantize_fp4(jnp.asarray(tensors["weight"]), jnp.asarray(tensors["weight_scale"]),
                                 jnp.dtype(dtype))


class W4A8MXFP4FP8(FP8Activations, MXFP4):
    """MXFP4 weights with static per-tensor FP8 activations (ModelOpt ``w4a8_mxfp4_fp8``; TensorRT-LLM)."""

    name = "w4a8_mxfp4_fp8"
    quant_algo = "W4A8_MXFP4_FP8"
    static_input_scale = True
    input_divisor = fp8_num.E4M3_MAX

    def match(self, weight, input) -> bool:
        return weight.format in self.weight_config_formats and input is not None and input.format == "fp8"

    def hf_layer_entry(self, block: int) -> dict:
        return {"quant_algo": self.quant_algo, "group_size": block}

    def dynamic_activation_config(self):
        return None


class MXFP8Quantizer(PerTensorAmax):
    """A ``TensorQuantizer`` with dynamic MXFP8 blocks (``mxfp8``): fake quant needs no amax (the weight
    quantizer still records max|w|, unused, as ModelOpt's does)."""

    name = "mxfp8"

    def amax_shape(self, config, tensor_shape, instances):
        if config.block_sizes.size != mx.BLOCK:
            raise UnsupportedError(f"MXFP8 with blocks of {config.block_sizes.size}: ModelOpt's MXFP8 uses blocks "
                                   f"of {mx.BLOCK} (block_sizes {{-1: 32, type: dynamic, scale_bits: e8m0}}).")
        return super().amax_shape(config, tensor_shape, instances)

    def fake_quant(self, x, amax, global_amax, block_size):
        return mx.fake_quant(x)


class MXFP4Quantizer(MXFP8Quantizer):
    """A ``TensorQuantizer`` with dynamic MXFP4 blocks (``mxfp4``)."""

    name = "mxfp4"

    def fake_quant(self, x, amax, global_amax, block_size):
        return mx.fake_quant_fp4(x)


class MXKernelQuantizer(PerTensorAmax):
    """A dynamic MX ``TensorQuantizer`` whose elements ModelOpt quantizes only in its CUDA kernel: MXINT8
    (``mxint8``), MXFP6 E3M2 (``mxfp6_e3m2``, hf_ptq's ``mxfp6``) and E2M3 (``mxfp6``); blocks of 8, 16 or 32.
    Fake quant is ``numerics.mx_kernel``. Nothing exports them: nvidia-modelopt 0.47's export refuses them too."""

    def __init__(self, name: str, element: str):
        self.name, self.element = name, element
        self.no_export_reason = (f"{name} weights cannot be exported: nvidia-modelopt 0.47 writes no checkpoint "
                                 "format for them (its export_hf_checkpoint fails on MXINT8 and refuses MXFP6), "
                                 "so no engine loads one; fake quant and evaluation work.")

    def amax_shape(self, config, tensor_shape, instances):
        if config.block_sizes.size not in (8, 16, 32):
            raise UnsupportedError(f"{self.name} with blocks of {config.block_sizes.size}: ModelOpt's MX kernel "
                                   "takes blocks of 8, 16 or 32.")
        return super().amax_shape(config, tensor_shape, instances)

    def fake_quant(self, x, amax, global_amax, block_size):
        return mx_kernel.fake_quant(x, self.element, block_size)


MX_KERNEL_QUANTIZERS = (MXKernelQuantizer("mxint8", "int8"), MXKernelQuantizer("mxfp6_e3m2", "e3m2"),
                        MXKernelQuantizer("mxfp6", "e2m3"))

__all__ = ["MXFP4", "MXFP8", "MX_KERNEL_QUANTIZERS", "MXFP4Quantizer", "MXFP8Quantizer", "MXKernelQuantizer",
           "W4A8MXFP4FP8"]
