"""W4A8_AWQ: INT4 weights in blocks of 128 inputs, then FP8 per tensor, with static per-tensor FP8 activations
(ModelOpt ``w4a8_awq``; hf_ptq ``--qformat w4a8_awq_beta``, whose preset calibrates with awq_lite; jaxquant runs
the same format with max calibration). TensorRT-LLM serves it; vLLM's ModelOpt loader does not.

The weight quantizer is ModelOpt's ``SequentialQuantizer`` (``cfg: [int4_per_block, fp8]``, jaxquant format
``int4_block128+fp8``): fake quant is INT4 with one amax per block of 128, then FP8 E4M3 with one amax per tensor,
``fp8_fq(int4_fq(w, block_amax), amax)``. Max calibration gives both from the weight itself: the block amax
``max|w|`` per block and the FP8 amax ``max|w|`` (the FP8 quantizer sees the raw weight while calibrating).

Tensors (docs/export.md): ``weight`` U8 ``[out/2, in]`` and ``weight_scale`` F32 ``[out, in/128]`` exactly as
W4A16_AWQ (two output rows per byte, ``block amax / 7``), plus ``weight_scale_2`` F32 ``[]`` = FP8 amax / 448 and
``input_scale`` F32 ``[]`` = input amax / 448; fused siblings (q/k/v, gate/up) share ``weight_scale_2`` and
``input_scale`` (their maxima), not the block scales. ``hf_quant_config.json``: ``W4A8_AWQ`` with ``group_size``,
``has_zero_point: false``, ``pre_quant_scale: true``; no ``config_groups`` in ``config.json``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.errors import ExportError, UnsupportedError
from jaxquant.formats.base import F32, DeferredCheck, TensorSpec, finite_stats
from jaxquant.formats.int4 import BLOCKS, W4A16AWQ, INT4BlockQuantizer
from jaxquant.numerics import fp8 as fp8_num
from jaxquant.numerics import int4 as int4_num
from jaxquant.numerics._exact import round_to_dtype
from jaxquant.formats.fp8 import FP8Activations


def _per_tensor(global_amax, ndim: int) -> jax.Array:
    """The FP8 amax (``[]``, or ``[E, 1, ...]`` for stacked experts) broadcastable to a tensor of ``ndim`` axes."""
    g = jnp.asarray(global_amax, jnp.float32)
    return g if g.ndim == 0 else g.reshape(g.shape[0], *(1,) * (ndim - 1))


@functools.partial(jax.jit, static_argnames=("block",))
def fake_quant(x: jax.Array, block_amax, amax, block: int) -> jax.Array:
    """``fp8_fq(int4_fq(x, block_amax), amax)``: INT4 blocks of ``block`` (``block_amax`` ``[..., nb, 1]``), then FP8
    per tensor (``amax`` ``[]`` or ``[E, 1, ...]``); the result has ``x``'s dtype, as each step of ModelOpt's.

    The INT4 step's bf16 / fp16 result is read back from its bits (``round_to_dtype``) before the FP8 step: XLA's
    GPU backend (``xla_allow_excess_precision``) otherwise drops that rounding and the FP8 step sees float32 values
    (6 of the 372 golden digests differed on an H100 before this)."""
    y = int4_num.fake_quant(x, block_amax, block)
    if y.dtype != jnp.float32:
        y = round_to_dtype(y.astype(jnp.float32), y.dtype)
    return fp8_num.fake_quant(y, _per_tensor(amax, x.ndim)).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _export(w, amax, block_amax, in_amax, *, compute_dtype):
    stats = {"w": finite_stats(w), "amax": finite_stats(amax), "blk": finite_stats(block_amax)}
    codes, scale = int4_num.quantize(w.astype(compute_dtype), block_amax[..., 0])
    out = {"weight": int4_num.pack_rows(codes), "weight_scale": scale,
           "weight_scale_2": fp8_num.scale_from_amax(amax).reshape(())}
    if in_amax is not None:
        stats["in"] = finite_stats(in_amax)
        out["input_scale"] = fp8_num.scale_from_amax(in_amax).reshape(())
    return out, stats


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(packed, scale, scale_2, dtype):
    w = int4_num.dequantize(int4_num.unpack_rows(packed), scale, jnp.float32)
    return fp8_num.fake_quant(w, jnp.asarray(scale_2, jnp.float32) * fp8_num.E4M3_MAX).astype(dtype)


class W4A8AWQ(FP8Activations, W4A16AWQ):
    """INT4 block-128 + FP8 weights, static FP8 activations (ModelOpt ``w4a8_awq``, ``quant_algo`` W4A8_AWQ)."""

    name = "w4a8_awq"
    pqs_format = "w4a8_awq"
    pqs_into_norm = True
    quant_algo = "W4A8_AWQ"
    weight_config_formats = ("int4_block128+fp8",)
    static_input_scale = True
    shares_fused_scales = True
    static_blocks = True  # block amax from the quantizer's amax, the FP8 amax from its global amax
    blocked_amax = False
    input_divisor = fp8_num.E4M3_MAX

    def match(self, weight, input) -> bool:
        fmt = weight.format
        if not (fmt.startswith("int4_block") and fmt.endswith("+fp8")):
            return False
        if fmt not in self.weight_config_formats:
            raise UnsupportedError(f"INT4 + FP8 weights ({fmt}) cannot be exported; W4A8_AWQ uses INT4 blocks of "
                                   f"{self.block_size} (int4_block{self.block_size}+fp8).")
        if input is None or input.format != "fp8":
            got = f"{input.format} activations" if input is not None else "unquantized activations"
            raise UnsupportedError(f"INT4 + FP8 weights with {got} cannot be exported: W4A8_AWQ serves static "
                                   "per-tensor FP8 activations (input_quantizer cfg: fp8), or use INT4 weights alone "
                                   "(W4A16_AWQ, --qformat int4_blockwise_weight_only).")
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        specs = super().export_specs(out, in_)
        if input_scale:
            specs.append(("input_scale", (), F32))
        return specs + [("weight_scale_2", (), F32)]

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        w = jnp.asarray(weight)
        *lead, out, n = self.check_packable(w.shape, what)
        if block_amax is None:
            raise ExportError(f"{what}: W4A8_AWQ needs the weight quantizer's per-block amax.")
        cd = jnp.dtype(compute_dtype) if compute_dtype is not None else w.dtype
        blk = jnp.asarray(block_amax, jnp.float32).reshape(*lead, out, n // self.block_size, 1)
        amax = jnp.asarray(w_amax, jnp.float32)
        ia = None if in_amax is None else jnp.asarray(in_amax, jnp.float32)
        out_t, stats = _export(w, amax, blk, ia, compute_dtype=cd)
        return out_t, DeferredCheck(stats, what, w, amax, blk, ia)

    def dequantize(self, tensors, dtype=jnp.float32) -> jax.Array:
        """``fp8_fq(code * weight_scale, 448 * weight_scale_2)``: the INT4 values, then the FP8 step of fake quant
        (with the fused group's shared ``weight_scale_2``)."""
        return _dequantize(jnp.asarray(tensors["weight"]), jnp.asarray(tensors["weight_scale"], jnp.float32),
                           jnp.asarray(tensors["weight_scale_2"], jnp.float32), jnp.dtype(dtype))

    def config_group(self, group_size=None) -> dict:
        gs = group_size or self.block_size
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float", "group_size": gs},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs}}


class INT4FP8Quantizer(INT4BlockQuantizer):
    """A sequential ``TensorQuantizer``: INT4 blocks of ``block`` then FP8 per tensor (``int4_block{N}+fp8``). Its
    amax is the INT4 block amax ``[..., ceil(n/N), 1]``, its global amax the FP8 one (``max|w|``; per expert for
    stacked experts)."""

    has_global_amax = True

    def __init__(self, block: int):
        super().__init__(block)
        self.name = f"int4_block{block}+fp8"

    def fake_quant(self, x, amax, global_amax, block_size):
        return fake_quant(x, amax, global_amax, self.block)


QUANTIZERS = tuple(INT4FP8Quantizer(b) for b in BLOCKS)

__all__ = ["INT4FP8Quantizer", "QUANTIZERS", "W4A8AWQ", "fake_quant"]
