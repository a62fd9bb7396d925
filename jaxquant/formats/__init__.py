"""Quantization formats as objects: one module per format family, one registry.

``get("nvfp4")`` returns the ``QuantFormat`` that owns NVFP4's export tensors, their shapes, its
dequantization and its ``hf_quant_config`` entries, all computed with the jitted numerics of
``jaxquant.numerics`` (docs/numerics.md, "Formats").
"""

from jaxquant.formats.base import QuantFormat
from jaxquant.formats.fp8 import kv_scale
from jaxquant.formats.registry import FORMATS, by_quant_algo, for_quantizers, get

__all__ = ["FORMATS", "QuantFormat", "by_quant_algo", "for_quantizers", "get", "kv_scale"]
