"""The registry of quantization formats: ModelOpt format string -> ``QuantFormat`` object.

Adding a format: write its module (a class satisfying ``jaxquant.formats.base.QuantFormat`` for export
and loading, and one satisfying ``QuantizerFormat`` for fake quant and calibration) and add a line to
``FORMATS`` / ``QUANTIZER_FORMATS`` below. Nothing else in jaxquant compares format strings.
"""

from __future__ import annotations

from jaxquant.errors import UnsupportedError
from jaxquant.formats.affine import QUANTIZERS as AFFINE_QUANTIZERS
from jaxquant.formats.base import QuantFormat, QuantizerFormat
from jaxquant.formats.fp8 import FP8, FP8PerChannel, FP8PerChannelQuantizer, FP8PerTokenQuantizer, FP8Quantizer
from jaxquant.formats.fp8_block import FP8BlockQuantizer, FP8BlockWeightOnly
from jaxquant.formats.int4 import QUANTIZERS as INT4_QUANTIZERS
from jaxquant.formats.int4 import W4A16AWQ
from jaxquant.formats.int8 import INT8W8A8, INT8PerChannelQuantizer, INT8Quantizer, INT8WeightOnly
from jaxquant.formats.mx import MX_KERNEL_QUANTIZERS, MXFP4, MXFP8, W4A8MXFP4FP8, MXFP4Quantizer, MXFP8Quantizer
from jaxquant.formats.nvfp4 import (
    NVFP4,
    W4A8NVFP4FP8,
    W4A16NVFP4,
    W4A16NVFP4BS32,
    NVFP4BS32Quantizer,
    NVFP4Quantizer,
    NVFP4Static,
    NVFP4StaticFourOverSix,
    NVFP4StaticFourOverSixQuantizer,
    NVFP4StaticQuantizer,
    W4A16NVFP4FourOverSix,
    W4A16NVFP4Static,
)
from jaxquant.formats.nvfp4_awq import NVFP4AWQ, NVFP4StaticAWQ, W4A16NVFP4AWQ, W4A16NVFP4StaticAWQ
from jaxquant.formats.w4a8_awq import QUANTIZERS as W4A8_AWQ_QUANTIZERS
from jaxquant.formats.w4a8_awq import W4A8AWQ

#: Every exportable format, by ModelOpt format string (also the order ``for_quantizers`` tries them).
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    FP8(),
    FP8PerChannel(),
    NVFP4(),
    NVFP4Static(),
    W4A16NVFP4(),
    W4A16NVFP4BS32(),
    W4A8NVFP4FP8(),
    INT8W8A8(),
    INT8WeightOnly(),
    W4A16AWQ(),
    W4A8AWQ(),
    FP8BlockWeightOnly(),
    MXFP8(),
    MXFP4(),
    W4A8MXFP4FP8(),
    NVFP4StaticFourOverSix(),
    W4A16NVFP4FourOverSix(),
    W4A16NVFP4Static(),
    NVFP4AWQ(),        # nvfp4 / w4a16_nvfp4 with an AWQ pre_quant_scale (pqs_format; never matched from configs)
    W4A16NVFP4AWQ(),
    NVFP4StaticAWQ(),  # nvfp4_static / w4a16_nvfp4_static with an AWQ pre_quant_scale
    W4A16NVFP4StaticAWQ(),
)}


#: What a ``TensorQuantizer`` does, by ``QuantizerConfig.format``: the formats jaxquant can calibrate and fake-quantize.
QUANTIZER_FORMATS: dict[str, QuantizerFormat] = {q.name: q for q in (
    FP8Quantizer(),
    FP8PerChannelQuantizer(),
    FP8PerTokenQuantizer(),
    NVFP4Quantizer(),
    NVFP4StaticQuantizer(),
    NVFP4BS32Quantizer(),
    INT8Quantizer(),
    INT8PerChannelQuantizer(),
    FP8BlockQuantizer(),
    MXFP8Quantizer(),
    MXFP4Quantizer(),
    *INT4_QUANTIZERS,
    *W4A8_AWQ_QUANTIZERS,
    *AFFINE_QUANTIZERS,         # K/V caches with a calibrated bias (fp8_affine, nvfp4_affine)
    *MX_KERNEL_QUANTIZERS,      # mxint8, mxfp6_e3m2, mxfp6: fake quant only (ModelOpt exports none of them)
    NVFP4StaticFourOverSixQuantizer(),  # static NVFP4 with Four-over-Six's block-scale normalization 256
)}


def _lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except (KeyError, TypeError):
        raise UnsupportedError(f"{what} {name!r} is not supported yet; supported: {', '.join(table)}.") from None


def quantizer_format(name: str) -> QuantizerFormat:
    """The quantizer side of ``QuantizerConfig.format`` ``name``; ``UnsupportedError`` listing the known ones."""
    return _lookup(QUANTIZER_FORMATS, name, "quantizer format")


def get(name: str) -> QuantFormat:
    """The format called ``name`` (ModelOpt's format string); ``UnsupportedError`` listing the known ones."""
    return _lookup(FORMATS, name, "quantization format")


def by_quant_algo(algo: str) -> QuantFormat | None:
    """The first registered format whose ``hf_quant_config`` ``quant_algo`` is ``algo`` (None if none)."""
    for f in FORMATS.values():
        if f.quant_algo == algo:
            return f
    return None


def for_quantizers(weight, input) -> QuantFormat | None:
    """The format a linear with these weight / input ``QuantizerConfig`` exports as (ModelOpt's
    ``get_quantization_format``): None when the weight quantizer is disabled.

    Raises:
      UnsupportedError: a combination ModelOpt would export in a format jaxquant does not write.
    """
    if weight is None or not weight.enable:
        return None
    inp = input if (input is not None and input.enable) else None
    for f in FORMATS.values():
        if f.match(weight, inp):
            return f
    known = sorted({w for f in FORMATS.values() for w in f.weight_config_formats})
    why = getattr(QUANTIZER_FORMATS.get(weight.format), "no_export_reason", None)
    if why:
        raise UnsupportedError(f"{why} Exportable weight formats: {', '.join(known)}")
    raise UnsupportedError(f"weight format {weight.format!r} cannot be exported; exportable: {', '.join(known)}")
