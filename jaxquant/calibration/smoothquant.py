"""SmoothQuant (ModelOpt's ``smoothquant``, ``SmoothQuantCalibConfig``): migrate activation outliers into INT8 weights.

1. Max calibration (weights, then the forward passes); each smoothable linear's input quantizer also collects the
   per-input-channel ``a_j = max |x_j|`` (``ChannelMax``, in the same jitted forward).
2. Per linear: ``w_j = max_i |W_ij|`` (in the weight dtype), ``s = w^(1-alpha) / a^alpha`` (float32); if some
   ``s_j <= 2^-31`` the channels with ``a_j <= 2^-31`` get 1; ``s`` is clamped to ``[1e-4, 1e4]``.
3. ``apply_smoothing(s)``: the input is multiplied by ``s`` (``pre_quant_scale``), the weight by ``1/s``, the weight
   amax is recalibrated and the per-tensor input amax becomes ``max_j(a_j * s_j)``.

Smoothable: a linear whose input quantizer is enabled, data-calibrated and per-tensor, with INT8 input and weight;
ModelOpt skips (with a warning) every other linear, so does jaxquant. Option: ``alpha`` (default 1.0; ModelOpt's
Gemma recipes use 0.5), and the options every algorithm takes (``layerwise``, ``moe_calib_experts_ratio``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxquant.calibration.max import CalibrationStats, max_calibrate
from jaxquant.calibration.sites import Site
from jaxquant.calibration.smoothing import ChannelMax, apply_smoothing, power, round_to, smooth_linears
from jaxquant.errors import DataError, RecipeError

log = logging.getLogger("jaxquant.calibration")

OPTIONS = ("alpha", "layerwise", "moe_calib_experts_ratio", "distributed_sync")
_EPS = 1.0 / (1 << 31)


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"alpha": float, "layerwise": bool}`` from a recipe's ``algorithm`` mapping (without ``method``).

    Raises:
      UnsupportedError: an option jaxquant does not know (named).
      RecipeError: ``alpha`` outside [0, 1].
    """
    from jaxquant.calibration.algorithms import parse_max_options, refuse_unknown

    refuse_unknown(options, OPTIONS, "smoothquant")
    alpha = options.get("alpha", 1.0)
    alpha = 1.0 if alpha is None else alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise RecipeError(f"smoothquant alpha must be a number in [0, 1], got {alpha!r}")
    shared = parse_max_options({k: v for k, v in options.items() if k != "alpha"})
    return {"alpha": float(alpha), "layerwise": shared["layerwise"]}


def smoothing_scale(act_amax: np.ndarray, weight: jax.Array, alpha: float) -> np.ndarray:
    """ModelOpt's SmoothQuant scale ``s`` (float32 ``[in]``) from the per-channel activation amax and ``W [out, in]``
    (step 2 of the module doc)."""
    w_max = np.asarray(jax.numpy.max(jax.numpy.abs(weight), axis=0).astype(jax.numpy.float32))
    a = np.asarray(act_amax, np.float32)
    with np.errstate(divide="ignore"):  # a channel that never saw a value: inf, clamped below as in ModelOpt
        s = (round_to(power(w_max, 1.0 - alpha), weight.dtype) / power(a, alpha)).astype(np.float32)
    if s.min() <= _EPS:
        s[a <= _EPS] = 1.0
    return np.clip(s, np.float32(1e-4), np.float32(1e4)).astype(np.float32)


def _smoothable(lin) -> str | None:
    """Why ``lin`` is not smoothed (ModelOpt's warnings), or None."""
    iq, wq = lin.iq, lin.wq
    if not iq.enabled or iq.config.is_dynamic or not iq.config.needs_calibration:
        return "is not calibrated, skip smoothing"
    if iq.config.num_bits != 8 or wq.config.num_bits != 8:
        return "Only int8 smoothing is supported"
    if iq.config.axis is not None:
        return "Only per-channel smoothing is supported"
    return None


def smoothquant(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None,
                layerwise: bool = False, **kw) -> CalibrationStats:
    """Run SmoothQuant on ``model`` (module doc); ``options`` from ``parse_options``; the other keywords are
    ``max_calibrate``'s. Returns the calibration forward's statistics.

    Raises:
      DataError: no calibration data (SmoothQuant needs activations).
    """
    opts = dict(options or parse_options({}))
    if data is None:
        raise DataError("smoothquant needs calibration data (the per-channel activation amax).")
    todo = []
    for lin in smooth_linears(sites, "smoothquant"):
        why = _smoothable(lin)
        if why is not None:
            warnings.warn(f"smoothquant: {lin.name}: {why}", stacklevel=2)
            continue
        lin.iq.calibrator = ChannelMax(lin.in_features)
        todo.append(lin)
    try:
        stats = max_calibrate(model, sites, data, layerwise=layerwise or opts.get("layerwise", False), **kw)
        act = {lin.name: np.asarray(lin.iq.calibrator.amax.value) for lin in todo}
    finally:
        for lin in todo:
            lin.iq.calibrator = None
    for lin in todo:
        s = smoothing_scale(act[lin.name], lin.weight, opts["alpha"])
        apply_smoothing(lin, s, act[lin.name])
    log.info("smoothquant: smoothed %d linear(s) (alpha %s)", len(todo), opts["alpha"])
    return stats


__all__ = ["OPTIONS", "parse_options", "smoothing_scale", "smoothquant"]
