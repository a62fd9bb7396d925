"""NVFP4 weights: E2M1 codes in blocks of 16 with E4M3 block scales and a float32 global scale.

Three ModelOpt formats, one family:

* ``nvfp4`` (W4A4, ``quant_algo`` NVFP4): dynamic block scales (from the weight), NVFP4 activations
  with a calibrated ``input_scale``;
* ``nvfp4_static`` (``quant_algo`` NVFP4 too): block scales from the weight quantizer's calibrated
  per-block amax (``get_weights_scaling_factor_from_quantizer``);
* ``w4a16_nvfp4`` (``quant_algo`` W4A16_NVFP4): NVFP4 weights, activations unquantized.

Tensors (docs/export.md): ``weight`` U8 ``[out, in/2]`` (even element in the low nibble),
``weight_scale`` F8_E4M3 ``[out, in/16]``, ``weight_scale_2`` F32 ``[]`` = ``amax / 2688``,
``input_scale`` F32 ``[]`` = ``amax / 2688``. A zero amax becomes 6 (the maxbound).
The numerics are ``jaxquant.numerics.nvfp4`` (``quantize``, ``dequantize``, ``global_scale``).
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
    check_amax,
    finite_stats,
)
from jaxquant.numerics import fp8 as fp8_num
from jaxquant.numerics import nvfp4 as nvfp4_num
from jaxquant.formats.fp8 import FP8Activations


def _input_scale(amax) -> jax.Array:
    a = jnp.asarray(amax, jnp.float32)
    return nvfp4_num.global_scale(jnp.where(a == 0, jnp.float32(nvfp4_num.E2M1_MAX), a))


@functools.partial(jax.jit, static_argnames=("compute_dtype", "block_size", "global_divisor", "fp8_input", "fp8_norm"))
def _export(w, amax, block_amax, in_amax, *, compute_dtype, block_size: int,
            global_divisor: float = nvfp4_num.GLOBAL_SCALE_DIVISOR, fp8_input: bool = False,
            fp8_norm: float = fp8_num.E4M3_MAX):
    stats = {"w": finite_stats(w), "amax": finite_stats(amax)}
    if block_amax is not None:
        stats["blk"] = finite_stats(block_amax)
    t = nvfp4_num.quantize(w, global_amax=jnp.asarray(amax, jnp.float32).reshape(()), block_amax=block_amax,
                           block_size=block_size, compute_dtype=compute_dtype, global_divisor=global_divisor,
                           fp8_norm=fp8_norm)
    out = {"weight": t.packed, "weight_scale": t.block_scale, "weight_scale_2": t.global_scale.reshape(())}
    if in_amax is not None:
        stats["in"] = finite_stats(in_amax)
        scale = fp8_num.scale_from_amax(in_amax) if fp8_input else _input_scale(in_amax)
        out["input_scale"] = scale.reshape(())
    return out, stats


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(packed, scale, scale_2, dtype):
    return nvfp4_num.dequantize(nvfp4_num.NVFP4Tensor(packed, scale, jnp.asarray(scale_2, jnp.float32)), dtype)


class NVFP4(FormatBase):
    """NVFP4 weights with dynamic block scales and NVFP4 activations (ModelOpt ``nvfp4``)."""

    name = "nvfp4"
    quant_algo = "NVFP4"
    pqs_format = "nvfp4_awq"  # with an AWQ pre_quant_scale: NVFP4_AWQ (formats/nvfp4_awq.py)
    block_size = 16
    weight_config_formats = ("nvfp4",)
    static_input_scale = True
    shares_fused_scales = True
    input_divisor = nvfp4_num.GLOBAL_SCALE_DIVISOR
    global_divisor = nvfp4_num.GLOBAL_SCALE_DIVISOR  # weight_scale_2 = amax / global_divisor
    fp8_norm = fp8_num.E4M3_MAX  # the E4M3 value of a static block whose amax is the global amax
    elements_per_byte = 2  # two E2M1 codes per uint8

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats:
            return False
        inf = input.format if input is not None else None
        if inf is None:
            return False  # weight-only: w4a16_nvfp4
        if inf != "nvfp4":
            raise UnsupportedError(
                f"NVFP4 weights in blocks of {self.block_size} with {inf} activations cannot be exported; "
                "jaxquant exports NVFP4 + FP8 activations (W4A8_NVFP4_FP8) with NVFP4 blocks of 32 "
                "(--qformat w4a8_nvfp4_fp8), NVFP4 activations (W4A4) or none (W4A16)."
            )
        return True

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        specs = [("weight", (out, in_ // 2), U8), ("weight_scale", (out, in_ // self.block_size), F8)]
        if input_scale:
            specs.append(("input_scale", (), F32))
        specs.append(("weight_scale_2", (), F32))
        return specs

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        w = jnp.asarray(weight)
        if w.shape[-1] % self.block_size:
            raise ExportError(
                f"{what}: input dimension {w.shape[-1]} is not a multiple of the NVFP4 block size "
                f"{self.block_size}; exclude this layer from NVFP4 in the recipe."
            )
        cd = jnp.dtype(compute_dtype) if compute_dtype is not None else w.dtype
        amax = jnp.asarray(w_amax, jnp.float32)
        blk = None
        if self.static_blocks:
            if block_amax is None:
                raise ExportError(f"{what}: {self.name} needs the weight quantizer's per-block amax.")
            blk = jnp.asarray(block_amax, jnp.float32)
        ia = None if in_amax is None else jnp.asarray(in_amax, jnp.float32)
        out, stats = _export(w, amax, blk, ia, compute_dtype=cd, block_size=self.block_size,
                             global_divisor=self.global_divisor, fp8_input=self.input_divisor == fp8_num.E4M3_MAX,
                             fp8_norm=self.fp8_norm)
        return out, DeferredCheck(stats, what, w, amax, blk, ia)

    def input_scale(self, amax, what: str = "input amax") -> jax.Array:
        check_amax(amax, what)
        return _input_scale(amax)

    def activation_config(self):
        from jaxquant.quantizer.config import BlockSizes, QuantizerConfig

        return QuantizerConfig(num_bits=(2, 1), block_sizes=BlockSizes(size=self.block_size, type="dynamic",
                                                                        scale_bits=(4, 3)))

    def dequantize(self, tensors, dtype=jnp.float32) -> jax.Array:
        return _dequantize(jnp.asarray(tensors["weight"]), jnp.asarray(tensors["weight_scale"]),
                           jnp.asarray(tensors["weight_scale_2"]), jnp.dtype(dtype))

    def config_group(self, group_size=None) -> dict:
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size}
        return {"input_activations": dict(fp4), "weights": dict(fp4)}


class NVFP4Static(NVFP4):
    """NVFP4 with calibrated per-block weight amax (ModelOpt ``nvfp4_static``, ``quant_algo`` NVFP4)."""

    name = "nvfp4_static"
    pqs_format = "nvfp4_static_awq"  # with an AWQ pre_quant_scale: NVFP4_AWQ (formats/nvfp4_awq.py)
    weight_config_formats = ("nvfp4_static",)
    static_blocks = True
    resmooth_keeps_global_amax = True


class NVFP4StaticFourOverSix(NVFP4Static):
    """Static NVFP4 weights with Four-over-Six scaling (``four_over_six: true``; ``quant_algo`` NVFP4, as ModelOpt
    writes it): ``weight_scale_2 = global_amax / 1536`` and block scales normalised to 256 (``numerics.nvfp4``);
    a reader dequantizes it like any NVFP4 checkpoint."""

    name = "nvfp4_static_four_over_six"
    pqs_format = None
    weight_config_formats = ("nvfp4_static_four_over_six",)
    global_divisor = nvfp4_num.E2M1_MAX * nvfp4_num.FOUR_OVER_SIX_FP8_NORM
    fp8_norm = nvfp4_num.FOUR_OVER_SIX_FP8_NORM


class W4A16NVFP4(NVFP4):
    """NVFP4 weights, unquantized activations (ModelOpt ``w4a16_nvfp4``, ``quant_algo`` W4A16_NVFP4)."""

    name = "w4a16_nvfp4"
    pqs_format = "w4a16_nvfp4_awq"
    quant_algo = "W4A16_NVFP4"
    weight_config_formats = ("nvfp4",)
    static_input_scale = False

    def match(self, weight, input) -> bool:
        return weight.format in self.weight_config_formats and input is None

    def config_group(self, group_size=None) -> dict:
        return {"weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size}}


class W4A16NVFP4Static(W4A16NVFP4):
    """Static NVFP4 weights (calibrated per-block amax, e.g. by mse), unquantized activations (``quant_algo``
    W4A16_NVFP4): block scales from the per-block amax, as ModelOpt's ``get_weights_scaling_factor_from_quantizer``
    takes them whenever the quantizer has a global amax."""

    name = "w4a16_nvfp4_static"
    pqs_format = "w4a16_nvfp4_static_awq"
    weight_config_formats = ("nvfp4_static",)
    static_blocks = True
    resmooth_keeps_global_amax = True


class W4A16NVFP4FourOverSix(W4A16NVFP4):
    """Four-over-Six static NVFP4 weights, unquantized activations (``quant_algo`` W4A16_NVFP4)."""

    name = "w4a16_nvfp4_four_over_six"
    pqs_format = None
    weight_config_formats = ("nvfp4_static_four_over_six",)
    static_blocks = True
    global_divisor = NVFP4StaticFourOverSix.global_divisor
    fp8_norm = NVFP4StaticFourOverSix.fp8_norm


class W4A16NVFP4BS32(W4A16NVFP4):
    """NVFP4 weights in blocks of 32, unquantized activations (``nvfp4_bs32`` weights; ModelOpt writes
    ``quant_algo`` W4A16_NVFP4 with ``group_size`` 32: hf_ptq ``--qformat nvfp4_mlp_weight_only``)."""

    name = "w4a16_nvfp4_bs32"
    pqs_format = None
    block_size = 32
    weight_config_formats = ("nvfp4_bs32",)


class W4A8NVFP4FP8(FP8Activations, NVFP4):
    """NVFP4 weights in blocks of 32 with static FP8 activations (ModelOpt ``w4a8_nvfp4_fp8``, ``quant_algo``
    W4A8_NVFP4_FP8; TensorRT-LLM serves it). The kernels dequantize the weight to FP8, so ModelOpt exports
    ``weight_scale_2 = amax / 448`` (not / 2688) and the block scales against it; ``input_scale = amax / 448``.
    The fake-quantized model uses NVFP4's own scales (``/ 2688``), exactly as ModelOpt's does."""

    name = "w4a8_nvfp4_fp8"
    pqs_format = None
    quant_algo = "W4A8_NVFP4_FP8"
    block_size = 32
    weight_config_formats = ("nvfp4_bs32",)
    input_divisor = fp8_num.E4M3_MAX
    global_divisor = fp8_num.E4M3_MAX
    config_groups_when_uniform = False  # ModelOpt 0.47 writes none for W4A8_NVFP4_FP8

    def match(self, weight, input) -> bool:
        if weight.format not in self.weight_config_formats or input is None:
            return False
        if input.format != "fp8":
            raise UnsupportedError(f"NVFP4 weights in blocks of 32 with {input.format} activations cannot be "
                                   "exported; W4A8_NVFP4_FP8 wants static per-tensor FP8 activations.")
        return True

    def config_group(self, group_size=None) -> dict:
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size or 32}}


# ----------------------------------------------------------------------------------------------- quantizers
class NVFP4Quantizer(PerTensorAmax):
    """A ``TensorQuantizer`` with NVFP4 and dynamic block scales (``QuantizerConfig.format`` ``nvfp4``): the
    per-tensor amax gives the global scale, each block's scale comes from the tensor itself."""

    name = "nvfp4"
    fused_weight_amax = True

    def fake_quant(self, x, amax, global_amax, block_size):
        return nvfp4_num.fake_quant_dynamic(x, amax, block_size=block_size)


class NVFP4BS32Quantizer(NVFP4Quantizer):
    """NVFP4 with dynamic blocks of 32 (``nvfp4_bs32``: the weights of W4A8_NVFP4_FP8 and of
    ``nvfp4_mlp_weight_only``); the same numerics with ``block_size`` 32."""

    name = "nvfp4_bs32"


class NVFP4StaticQuantizer(NVFP4Quantizer):
    """NVFP4 with calibrated per-block amax ``[..., ceil(K / block)]`` and a global amax (``nvfp4_static``)."""

    name = "nvfp4_static"
    has_global_amax = True
    per_tensor_amax = False

    def amax_shape(self, config, tensor_shape, instances):
        if tensor_shape is None:
            raise ValueError("static-block quantizers need tensor_shape")
        *lead, k = tensor_shape
        bs = config.block_sizes.size if config.block_sizes is not None and config.block_sizes.size else 16
        return (*lead, -(-k // bs))

    def reduce_amax(self, a, amax_shape, instances, block_size):
        return nvfp4_num.block_amax(a, block_size=block_size)

    def fake_quant(self, x, amax, global_amax, block_size):
        return nvfp4_num.fake_quant_static(x, amax, global_amax, block_size=block_size)

    def amax_per_element(self, amax, shape, block_size):
        k = shape[-1]
        a = jnp.asarray(amax, jnp.float32).reshape(*shape[:-1], -1)
        return jnp.repeat(a, block_size, axis=-1)[..., :k]


class NVFP4StaticFourOverSixQuantizer(NVFP4StaticQuantizer):
    """Static NVFP4 with Four-over-Six's block-scale normalization 256 (``nvfp4_static_four_over_six``)."""

    name = "nvfp4_static_four_over_six"

    def fake_quant(self, x, amax, global_amax, block_size):
        return nvfp4_num.fake_quant_static(x, amax, global_amax, block_size=block_size,
                                           fp8_norm=nvfp4_num.FOUR_OVER_SIX_FP8_NORM)
