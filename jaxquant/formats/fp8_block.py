"""FP8 E4M3 weights with one scale per 2-D block (128 x 128), activations unquantized (ModelOpt ``fp8_pb_wo``;
hf_ptq ``--qformat fp8_2d_blockwise_weight_only``; vLLM serves it).

A weight ``[M, N]`` is cut into ``[ceil(M/bm), bm, ceil(N/bn), bn]`` blocks, zero-padded at the end of each axis
(ModelOpt ``_setup_for_blockquant``); the amax is stored as ModelOpt stores it, ``[Mb, 1, Nb, 1]``.

* Fake quant: FP8 fake quant (``numerics.fp8.fake_quant``: ``x * (448 / amax)``, clip, E4M3, times the inverse
  scale) of each block with its amax, then the padding is cropped.
* Export (docs/export.md): ``weight`` F8_E4M3 ``[M, N]`` = ``e4m3(w / weight_scale)`` with each element divided
  in float32 by its block's scale, no clamp (ModelOpt ``FP8QTensor.quantize``); ``weight_scale`` F32
  ``[Mb, 1, Nb, 1]`` = ``amax / 448`` (a zero amax gives 1.0), not squeezed, as ModelOpt writes it; no
  ``input_scale``. ``hf_quant_config.json`` says ``"quant_algo": "fp8_pb_wo"`` in lower case, as ModelOpt 0.47
  writes it (loaders compare it upper-cased), with no ``group_size``.
* The export divides where fake quant multiplies by the reciprocal, so a few codes in a million differ between
  the fake-quantized model and the checkpoint, in ModelOpt as here.
* Fused siblings keep their own block scales (ModelOpt unifies only one-element amaxes, i.e. weights of at most
  128 x 128, which jaxquant does not unify: such a model gets one scale per sibling).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.errors import UnsupportedError
from jaxquant.formats.base import F8, F32, TensorSpec, WeightOnlyFormat, finite_stats
from jaxquant.numerics import fp8 as fp8_num


def block_shape(config) -> tuple[int, int]:
    """``(rows, cols)`` of one block of a 2-D block config (``block_sizes {-1: cols, -2: rows}``)."""
    bs = config.block_sizes
    rows = dict(bs.other_axes).get(-2)
    if bs.axis != -1 or rows is None or bs.size is None or len(bs.other_axes) != 1:
        raise UnsupportedError(f"2-D block quantization wants block_sizes {{-1: N, -2: M}}, got {bs}")
    return rows, bs.size


def to_blocks(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """``[..., M, N]`` -> ``[..., ceil(M/rows), rows, ceil(N/cols), cols]``, zero-padded at the end of each axis."""
    *lead, m, n = x.shape
    mb, nb = -(-m // rows), -(-n // cols)
    pad = [(0, 0)] * len(lead) + [(0, mb * rows - m), (0, nb * cols - n)]
    return jnp.pad(x, pad).reshape(*lead, mb, rows, nb, cols)


def from_blocks(b: jax.Array, m: int, n: int) -> jax.Array:
    """The inverse of ``to_blocks``: ``[..., Mb, rows, Nb, cols]`` -> ``[..., m, n]`` (padding cropped)."""
    *lead, mb, rows, nb, cols = b.shape
    return b.reshape(*lead, mb * rows, nb * cols)[..., :m, :n]


#: The block FP8_PB_WO checkpoints use (rows, cols); ModelOpt exports other 2-D blocks under the same name, but
#: no loader reads them, so jaxquant refuses them (``FP8BlockWeightOnly.match``).
EXPORT_BLOCK = (128, 128)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _export(w, amax, *, compute_dtype):
    stats = {"w": finite_stats(w), "amax": finite_stats(amax)}
    m, n = w.shape
    q, scale = fp8_num.quantize(to_blocks(w.astype(compute_dtype), *EXPORT_BLOCK), amax)
    return {"weight": from_blocks(q, m, n), "weight_scale": scale}, stats


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q, scale, dtype):
    m, n = q.shape
    blocks = fp8_num.dequantize(to_blocks(q, *EXPORT_BLOCK), scale, jnp.float32)
    return from_blocks(blocks, m, n).astype(dtype)


class FP8BlockWeightOnly(WeightOnlyFormat):
    """FP8 weights with 2-D block scales, activations unquantized (ModelOpt ``fp8_pb_wo``)."""

    name = "fp8_pb_wo"
    kernel = _export
    dequantizer = _dequantize
    quant_algo = "fp8_pb_wo"  # ModelOpt 0.47 writes the lower-case format name
    weight_config_formats = ("fp8_2d_block",)
    blocked_amax = True
    config_groups_when_uniform = False
    input_divisor = fp8_num.E4M3_MAX

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats:
            return False
        if block_shape(weight) != EXPORT_BLOCK:
            raise UnsupportedError(f"FP8 2-D blocks of {block_shape(weight)} cannot be exported; FP8_PB_WO "
                                   f"checkpoints use {EXPORT_BLOCK[0]} x {EXPORT_BLOCK[1]} blocks.")
        if input is not None:
            raise UnsupportedError(f"FP8 2-D block weights with {input.format} activations cannot be exported: "
                                   "FP8_PB_WO is weight-only. Disable the input quantizers.")
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        rows, cols = EXPORT_BLOCK
        return [("weight", (out, in_), F8), ("weight_scale", (-(-out // rows), 1, -(-in_ // cols), 1), F32)]

    def config_group(self, group_size=None) -> dict:
        return {"weights": {"dynamic": False, "num_bits": 8, "type": "float", "strategy": "block",
                            "block_structure": [128, 128]}}


# ----------------------------------------------------------------------------------------------- quantizer
class FP8BlockQuantizer:
    """A ``TensorQuantizer`` with FP8 E4M3 and one amax per 2-D block of the last two axes (``fp8_2d_block``);
    ``block_size`` is the ``(rows, cols)`` block."""

    name = "fp8_2d_block"
    has_global_amax = False
    per_tensor_amax = False
    fused_weight_amax = False

    def amax_shape(self, config, tensor_shape, instances):
        if tensor_shape is None or len(tensor_shape) < 2:
            raise ValueError("2-D block quantizers need the (at least 2-D) tensor_shape")
        rows, cols = block_shape(config)
        *lead, m, n = tensor_shape
        return (*lead, -(-m // rows), 1, -(-n // cols), 1)

    def reduce_amax(self, a, amax_shape, instances, block_size):
        rows, cols = block_size
        return jnp.max(to_blocks(a, rows, cols), axis=(-3, -1), keepdims=True)

    def fake_quant(self, x, amax, global_amax, block_size):
        rows, cols = block_size
        *_, m, n = x.shape
        return from_blocks(fp8_num.fake_quant(to_blocks(x, rows, cols), amax), m, n)

    def amax_per_element(self, amax, shape, block_size):
        rows, cols = block_size
        a = jnp.asarray(amax, jnp.float32)
        a = jnp.broadcast_to(a, (*a.shape[:-4], a.shape[-4], rows, a.shape[-2], cols))
        return from_blocks(a, shape[-2], shape[-1])

    def __repr__(self) -> str:
        return f"<QuantizerFormat {self.name}>"


__all__ = ["FP8BlockQuantizer", "FP8BlockWeightOnly", "block_shape", "from_blocks", "to_blocks"]
