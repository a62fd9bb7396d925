"""Calibration (ModelOpt's ``max``) and the ``quantize()`` entry point. See docs/ptq.md.

* ``quantize(model, recipe, data)`` -> ``QuantizeResult``: apply the recipe, calibrate, finalize,
  leave the model fake-quantized (``api.py``).
* ``max.py``: weight amax from weights, the jitted per-batch calibration step, ``set_quant_mode``.
* ``finalize.py``: NaN/Inf check, MoE expert sync + fallbacks, NVFP4 fused-sibling unification.
* ``state.py``: the calibration state as ``{"<quantizer>._amax": array}``, save / load (.safetensors).
* ``algorithms.py``: the ``algorithm`` field -> implementation (``max`` today).
"""

from jaxquant.calibration.algorithms import ALGORITHMS, get_algorithm, parse_algorithm, supported_algorithms
from jaxquant.calibration.api import QuantizeResult, auto_batch_size, check_sequence_length, quantize
from jaxquant.calibration.finalize import FinalizeReport, finalize
from jaxquant.calibration.max import CalibrationStats, calibrate_weights, set_quant_mode
from jaxquant.calibration.sites import Site, quantizer_sites
from jaxquant.calibration.state import (
    calibration_state,
    load_calibration_state,
    read_calibration_state,
    save_calibration_state,
)

__all__ = [
    "ALGORITHMS",
    "CalibrationStats",
    "FinalizeReport",
    "QuantizeResult",
    "Site",
    "auto_batch_size",
    "calibrate_weights",
    "calibration_state",
    "check_sequence_length",
    "finalize",
    "get_algorithm",
    "load_calibration_state",
    "parse_algorithm",
    "quantize",
    "quantizer_sites",
    "read_calibration_state",
    "save_calibration_state",
    "set_quant_mode",
    "supported_algorithms",
]
