"""Quantizer configs and the ``TensorQuantizer`` site module."""

from jaxquant.quantizer.config import BlockSizes, QuantizerConfig, SUPPORTED_FORMATS
from jaxquant.quantizer.tensor_quantizer import (
    QuantAmax,
    QuantGlobalAmax,
    TensorQuantizer,
    fake_quant_ste,
)

__all__ = [
    "BlockSizes",
    "QuantizerConfig",
    "SUPPORTED_FORMATS",
    "QuantAmax",
    "QuantGlobalAmax",
    "TensorQuantizer",
    "fake_quant_ste",
]
