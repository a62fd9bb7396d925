"""INT4 weights in blocks of 128 inputs, activations unquantized (ModelOpt ``int4_awq``, ``quant_algo`` W4A16_AWQ;
hf_ptq ``--qformat int4_blockwise_weight_only`` with max calibration; ``int4_awq`` adds the awq_lite algorithm).
TensorRT-LLM serves it; vLLM's ModelOpt loader does not.

Tensors (docs/export.md): ``weight`` U8 ``[out/2, in]``: INT4 codes, two **output rows** per byte (row ``2k`` in
the low nibble); ``weight_scale`` F32 ``[out, in/128]`` = ``amax / 7`` per block (a zero block gets 1.0); no
``input_scale``. ``hf_quant_config.json``: ``W4A16_AWQ`` with ``group_size``, ``has_zero_point: false`` and
``pre_quant_scale: true`` (ModelOpt writes these for every INT4 export, AWQ or not); no ``config_groups``. Fused
siblings keep their own block scales. The input dimension must be a multiple of the block (ModelOpt refuses partial
blocks at export; fake quant pads them). The numerics are ``jaxquant.numerics.int4``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.errors import ExportError, UnsupportedError
from jaxquant.formats.base import F32, U8, DeferredCheck, TensorSpec, WeightOnlyFormat, finite_stats
from jaxquant.numerics import int4 as int4_num

#: Block sizes (inputs per scale) registered as quantizer formats ``int4_block{N}``.
BLOCKS = (32, 64, 128)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _export(w, amax, *, compute_dtype):
    stats = {"w": finite_stats(w), "amax": finite_stats(amax)}
    codes, scale = int4_num.quantize(w.astype(compute_dtype), amax[..., 0])  # amax [..., out, nb, 1]
    return {"weight": int4_num.pack_rows(codes), "weight_scale": scale}, stats


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(packed, scale, dtype):
    return int4_num.dequantize(int4_num.unpack_rows(packed), scale, dtype)


class W4A16AWQ(WeightOnlyFormat):
    """INT4 block weights, unquantized activations (ModelOpt ``int4_awq``, ``quant_algo`` W4A16_AWQ)."""

    name = "int4_awq"
    pqs_format = "int4_awq"
    pqs_into_norm = True
    kernel = _export
    dequantizer = _dequantize
    quant_algo = "W4A16_AWQ"
    block_size = 128
    weight_config_formats = ("int4_block128",)
    blocked_amax = True
    config_groups_when_uniform = False
    input_divisor = int4_num.INT4_MAX

    def match(self, weight, input) -> bool:
        if "+" in weight.format:  # a sequential chain (INT4 then FP8: W4A8_AWQ)
            return False
        if weight.format.startswith("int4_block") and weight.format not in self.weight_config_formats:
            raise UnsupportedError(f"INT4 weights in blocks of {weight.format[len('int4_block'):]} cannot be exported; "
                                   "jaxquant writes W4A16_AWQ with blocks of 128 (TensorRT-LLM's default).")
        if weight.format not in self.weight_config_formats:
            return False
        if input is not None:
            raise UnsupportedError(f"INT4 block weights with {input.format} activations cannot be exported: W4A16_AWQ "
                                   "is weight-only, and W4A8_AWQ (FP8 activations) quantizes the weights INT4 then "
                                   "FP8 (cfg: [int4_per_block, fp8], --qformat w4a8_awq_beta). Disable the input "
                                   "quantizers or use that weight config.")
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        block = self.block_size
        if out % 2:
            raise UnsupportedError(f"INT4 weights pack two output rows per byte; {out} rows is odd. Leave this "
                                   "layer unquantized.")
        if in_ % block:
            raise UnsupportedError(f"{in_} inputs are not a multiple of the INT4 block ({block}); ModelOpt does not "
                                   "export partial blocks. Leave this layer unquantized.")
        return [("weight", (out // 2, in_), U8), ("weight_scale", (out, in_ // block), F32)]

    def check_packable(self, shape: tuple[int, ...], what: str) -> tuple[int, ...]:
        """``shape`` (``[..., out, in]``), or ``ExportError`` unless it packs as whole INT4 blocks and row pairs."""
        *_, out, n = shape
        if n % self.block_size or out % 2:
            raise ExportError(f"{what}: input dimension {n} is not a multiple of the INT4 block size {self.block_size}"
                              f" or output dimension {out} is odd; ModelOpt's {self.quant_algo} packs whole blocks and "
                              "row pairs only. Leave this layer unquantized.")
        return tuple(shape)

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        w = jnp.asarray(weight)
        *lead, out, n = self.check_packable(w.shape, what)
        amax = jnp.asarray(w_amax, jnp.float32)
        want = (*lead, out, n // self.block_size, 1)
        if amax.ndim < len(want):
            amax = amax.reshape(amax.shape + (1,) * (len(want) - amax.ndim))
        amax = jnp.broadcast_to(amax, want)  # a coarser amax (per tensor, per row) bounds each of its blocks
        return super().export_tensors_deferred(w, amax, compute_dtype=compute_dtype, what=what)

    def weight_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The logical ``[..., out, in]`` of a stored ``[..., out/2, in]`` weight."""
        return (*stored[:-2], stored[-2] * 2, stored[-1])

    def hf_layer_entry(self, block: int) -> dict[str, Any]:
        return {"quant_algo": self.quant_algo, "group_size": block, "has_zero_point": False, "pre_quant_scale": True}

    def config_group(self, group_size=None) -> dict:
        return {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "strategy": "group",
                            "group_size": group_size or self.block_size}}


# ----------------------------------------------------------------------------------------------- quantizer
class INT4BlockQuantizer:
    """A ``TensorQuantizer`` with signed INT4 and one amax per block of ``block_size`` elements along the last axis
    (``int4_block{N}``, ModelOpt's ``int4_per_block``: ``num_bits 4, block_sizes {-1: N, type: static}``). The amax
    is ``[..., ceil(n/N), 1]``."""

    has_global_amax = False
    per_tensor_amax = False
    fused_weight_amax = False

    def __init__(self, block: int):
        self.block = block
        self.name = f"int4_block{block}"

    def amax_shape(self, config, tensor_shape, instances):
        if tensor_shape is None or len(tensor_shape) < 1:
            raise ValueError("INT4 block quantizers need the tensor_shape")
        *lead, n = tensor_shape
        return (*lead, -(-n // self.block), 1)

    def reduce_amax(self, a, amax_shape, instances, block_size):
        return jnp.max(int4_num.to_blocks(a, self.block), axis=-1, keepdims=True)

    def fake_quant(self, x, amax, global_amax, block_size):
        return int4_num.fake_quant(x, amax, self.block)

    def amax_per_element(self, amax, shape, block_size):
        a = jnp.asarray(amax, jnp.float32)
        a = jnp.broadcast_to(a, (*a.shape[:-1], self.block))
        return int4_num.from_blocks(a, shape[-1])

    def __repr__(self) -> str:
        return f"<QuantizerFormat {self.name}>"


QUANTIZERS = tuple(INT4BlockQuantizer(b) for b in BLOCKS)

__all__ = ["BLOCKS", "INT4BlockQuantizer", "QUANTIZERS", "W4A16AWQ"]
