"""Quantization formats as objects: one module per format family, one registry.

``get("nvfp4")`` returns the ``QuantFormat`` that owns NVFP4's export tensors, their shapes, its
dequantization and its ``hf_quant_config`` entries, all computed with the jitted numerics of
``jaxquant.numerics`` (docs/numerics.md, "Formats"); ``quantizer_format("nvfp4")`` the ``QuantizerFormat``
that owns its fake quant and its calibration statistic.
"""

from jaxquant.formats.base import QuantFormat, QuantizerFormat
from jaxquant.formats.fp8 import kv_scale
from jaxquant.formats.registry import (
    FORMATS,
    QUANTIZER_FORMATS,
    by_quant_algo,
    for_quantizers,
    get,
    quantizer_format,
)

__all__ = ["FORMATS", "QUANTIZER_FORMATS", "QuantFormat", "QuantizerFormat", "by_quant_algo", "for_quantizers",
           "get", "kv_scale", "quantizer_format"]
