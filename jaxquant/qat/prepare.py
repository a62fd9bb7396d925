"""``prepare_qat`` / ``finish_qat``: a model ready to train fake-quantized, and back to an exportable one.

    result = prepare_qat(model, "general/ptq/nvfp4_default-kv_fp8", calib_batches)   # PTQ first
    ... train with nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param) ...
    finish_qat(model)                       # amax frozen, fused siblings unified as export will
    export_hf(loaded, "out", resolution=result.resolution)

``prepare_qat`` is ``jaxquant.quantize`` (recipe, max calibration, finalize, fake-quant mode) plus:
every ``nnx.Linear`` of a user's model gets quantizer sites (``attach_quantizers``), and every
``TensorQuantizer`` becomes a ``QATQuantizer`` (ModelOpt's ``pass_through_bwd``, dynamic or
learnable amax; see ``quantizer.py``). Weight amax is calibrated once, from the weights before
training (ModelOpt's QAT keeps the calibrated ``_amax`` too): trained weights that grow beyond it
are clipped in the forward pass, and the export clips the same way, so the checkpoint computes
what was trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from jaxquant.calibration import (
    CalibrationStats,
    QuantizeResult,
    calibrate_weights,
    calibration_state,
    finalize,
    load_calibration_state,
    quantize,
    quantizer_sites,
    set_quant_mode,
)
from jaxquant.calibration.finalize import site_configs
from jaxquant.calibration.max import default_forward, run_calibration, run_forward_loop
from jaxquant.errors import DataError
from jaxquant.qat.nnx_linear import attach_quantizers
from jaxquant.qat.quantizer import AmaxMode, QATQuantizer

LearnAmax = bool | Literal["all", "weights", "activations"]


def _learns(site, learn_amax: LearnAmax) -> bool:
    if not learn_amax or not site.has_state:
        return False
    if learn_amax == "weights":
        return site.role == "weight"
    if learn_amax == "activations":
        return site.is_activation
    return True


def prepare_qat(
    model: Any,
    recipe: Any,
    calibration_data: Any = None,
    *,
    activation_amax: AmaxMode | None = None,
    learn_amax: LearnAmax = False,
    forward: Callable | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    strict: bool | str = False,
) -> QuantizeResult:
    """Quantize ``model`` in place for quantization-aware training.

    Args:
      model: a jaxquant decoder, any NNX model with ``TensorQuantizer`` sites, or a user's NNX
        model built from ``nnx.Linear`` (quantizer sites are attached to each, named by NNX path).
      recipe: a recipe name / path, ``Recipe``, ModelOpt-style dict, or an ``apply_recipe`` resolution.
      calibration_data: as for ``quantize`` (batches of token ids, or a ``forward_loop(model)``
        callable for models whose input is not token ids). None: weights only.
      activation_amax: ``"static"`` (calibrated on ``calibration_data`` by max, fixed while
        training; the default when data is given) or ``"dynamic"`` (``max|x|`` of each tensor,
        every step; the default without data). Constant-amax quantizers (KV ``*_cast``) keep
        their constant either way.
      learn_amax: make calibrated amax trainable (``LearnableAmax``, LSQ gradient): True/"all",
        "weights" or "activations". Train them by adding ``LearnableAmax`` to the optimizer's ``wrt``.
      forward: ``forward(model, input_ids, attention_mask)`` for calibration batches.
      batch_size, progress, strict: as for ``quantize``.

    Returns:
      ``quantize``'s ``QuantizeResult`` (its ``resolution`` is what ``export_hf`` takes).

    Raises:
      DataError: ``activation_amax="static"`` without ``calibration_data``.
    """
    if activation_amax is None:
        activation_amax = "static" if calibration_data is not None else "dynamic"
    if activation_amax not in ("static", "dynamic"):
        raise ValueError(f"activation_amax must be 'static' or 'dynamic', got {activation_amax!r}")
    if learn_amax not in (False, True, "all", "weights", "activations"):
        raise ValueError(f"learn_amax must be a bool, 'all', 'weights' or 'activations', got {learn_amax!r}")
    if activation_amax == "static" and calibration_data is None:
        raise DataError("activation_amax='static' needs calibration_data (batches or a forward_loop); pass it, "
                        "or use activation_amax='dynamic' (amax = max|x| of every tensor, every step).")
    attach_quantizers(model)
    if calibration_data is not None:
        result = quantize(model, recipe, calibration_data, batch_size=batch_size, progress=progress,
                          forward=forward, strict=strict)
        sites = quantizer_sites(model)
    else:
        result, sites = _weights_only(model, recipe, strict)
    for s in sites:
        dynamic = activation_amax == "dynamic" and s.calibrates_from_data
        q = QATQuantizer.convert(s.quantizer, amax_mode="dynamic" if dynamic else "static")
        if not dynamic and _learns(s, learn_amax):
            q.make_learnable()
    return result


def _weights_only(model, recipe, strict) -> tuple[QuantizeResult, list]:
    """``quantize`` without activation data: recipe, weight amax, finalize, fake-quant mode."""
    from jaxquant.recipe import apply_recipe
    from jaxquant.recipe.matcher import Resolution

    t0 = time.perf_counter()
    resolution = recipe if isinstance(recipe, Resolution) else apply_recipe(model, recipe, strict=strict)
    sites = quantizer_sites(model)
    calibrate_weights(sites, model)
    state, report = finalize(calibration_state(model, sites), site_configs(sites), warn=False)
    load_calibration_state(model, state, sites=sites)
    set_quant_mode(sites, "fake_quant")
    dt = time.perf_counter() - t0
    return QuantizeResult(resolution, state, {"weights": dt, "total": dt}, CalibrationStats(), report, None), sites


def finish_qat(
    model: Any,
    calibration_data: Any = None,
    *,
    forward: Callable | None = None,
    progress: bool = False,
) -> QuantizeResult:
    """Make a QAT-trained model exportable, in place; its forward pass then equals the export's.

    1. Dynamic activation quantizers get a static amax by max calibration over
       ``calibration_data`` (an iterable of batches or a ``forward_loop(model)``; required only
       when such quantizers exist).
    2. Learnable amax become plain ``QuantAmax`` again (frozen at their trained values).
    3. ``finalize``: NaN/Inf check, MoE expert sync, and NVFP4 fused siblings (q/k/v, gate/up)
       unified to their max amax, which is what ``export_hf`` writes (learned amax may have drifted
       apart).
    4. Every enabled quantizer is left in ``fake_quant`` mode.

    Trained weights and the static weight amax are kept as they are.

    Returns:
      a ``QuantizeResult`` (``resolution`` None) with the final calibration state.
    """
    t_start = time.perf_counter()
    sites = quantizer_sites(model)
    dyn = [s for s in sites if isinstance(s.quantizer, QATQuantizer) and s.quantizer.amax_mode == "dynamic"
           and s.calibrates_from_data]
    stats = CalibrationStats()
    if dyn:
        if calibration_data is None:
            raise DataError(f"{len(dyn)} quantizer(s) trained with a dynamic amax (e.g. {dyn[0].names[0]}) need "
                            "calibration data for the static amax the export writes; pass calibration_data.")
        chosen = set(id(s) for s in dyn)
        for s in sites:
            q = s.quantizer
            if id(s) in chosen:
                q.amax.value = q.amax.value * 0
                q.set_mode("calibrate")
            else:
                q.set_mode("off")
        if callable(calibration_data) and not hasattr(calibration_data, "__iter__"):
            stats = run_forward_loop(model, sites, calibration_data)
        else:
            stats = run_calibration(model, sites, calibration_data, forward=forward or default_forward,
                                    progress=progress)
        for s in dyn:
            s.quantizer.amax_mode = "static"
    for s in sites:
        if isinstance(s.quantizer, QATQuantizer):
            s.quantizer.make_learnable(False)
    t0 = time.perf_counter()
    state, report = finalize(calibration_state(model, sites), site_configs(sites))
    load_calibration_state(model, state, sites=sites)
    set_quant_mode(sites, "fake_quant")
    timings = {"calibrate": stats.run_s, "compile": stats.compile_s, "finalize": time.perf_counter() - t0,
               "total": time.perf_counter() - t_start}
    return QuantizeResult(None, state, timings, stats, report, "max" if dyn else None)


__all__ = ["finish_qat", "prepare_qat"]
