"""Calibration algorithms by name, as a recipe's ``algorithm`` field names them.

The field is ModelOpt's: a string (``"max"``), a mapping with a ``method`` key
(``{"method": "max", "sync_expert_weight_amax": false}``), None (no calibration), or a list of those. Each algorithm
is an ``Algorithm``: ``run(model, sites, data, **kw) -> CalibrationStats`` and ``parse(options)`` (its own
module's option parser; the parsed options carry the finalize options they imply, and those named in
``run_options`` are passed to ``run``, ``"options"`` meaning the whole parsed dict). ``max``, ``mse`` (``mse.py``),
``local_hessian`` (``local_hessian.py``), ``nvfp4_act_headroom`` (``act_headroom.py``), ``smoothquant``
(``smoothquant.py``), ``awq_lite`` (``awq.py``), ``awq_clip`` and ``awq_full`` (``awq_clip.py``), ``svdquant``
(``svdquant.py``) and ``gptq`` (``gptq.py``) are implemented, and a list of algorithms runs them in sequence (``sequence.py``); the others slot in
by adding an entry to ``ALGORITHMS``: each runs ``max`` first in ModelOpt, so they can call ``max_calibrate`` and then
refine weights / amax on the same sites.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxquant.calibration import max as max_mod
from jaxquant.calibration import mse as mse_mod
from jaxquant.errors import RecipeError, UnsupportedError

#: ModelOpt algorithms jaxquant does not implement yet (for messages).
KNOWN_UNSUPPORTED = ("lsq",)

# MaxCalibConfig fields and how jaxquant treats them.
_MAX_OPTIONS = {
    "distributed_sync": "ignored: jaxquant calibrates in one process (a jitted step over all devices)",
    "sync_expert_weight_amax": "honoured",
    "shared_states": "honoured (weight_global_amax.patterns)",
    "skip_forward_without_activation_calib": "honoured",
    "layerwise": "honoured ({enable, checkpoint_dir, save_every, calib_mutates_weights}: calibration/layerwise.py, "
                 "calibration/resume.py); get_qdq_activations_from_prev_layer: true refused",
    "moe_calib_experts_ratio": "not supported",
}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One calibration method."""

    name: str
    run: Callable[..., Any]
    options: tuple[str, ...] = ()
    parse: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None  # options -> parsed options
    run_options: tuple[str, ...] = ()  # parsed options passed to ``run`` as keywords ("options": all)
    #: ``run`` fixes the weights and their amax before its first forward pass and then calls its
    #: ``on_weights_calibrated()`` argument (``jaxquant ptq`` starts writing the export there)
    early_weights: bool = False


def parse_algorithm(algorithm: Any) -> tuple[str | None, dict[str, Any]]:
    """``(method, options)`` from a recipe's ``algorithm`` field.

    Raises:
      RecipeError: a malformed field (a mapping without ``method``, a non-string method), or a list (only
        ``resolve_algorithm`` takes one).
    """
    if algorithm is None:
        return None, {}
    if isinstance(algorithm, str):
        return algorithm, {}
    if isinstance(algorithm, Mapping):
        method = algorithm.get("method")
        if method is not None and not isinstance(method, str):
            raise RecipeError(f"algorithm.method must be a string, got {method!r}")
        if method is None and algorithm:
            raise RecipeError(f"algorithm {dict(algorithm)!r} has no 'method' key")
        return method, {k: v for k, v in algorithm.items() if k != "method"}
    if isinstance(algorithm, (list, tuple)):
        raise RecipeError(f"a list of algorithms ({algorithm!r}) is accepted only as a recipe's algorithm field "
                          "(resolve_algorithm), not here.")
    raise RecipeError(f"algorithm must be a name, a mapping with 'method', or null; got {algorithm!r}")


def parse_max_options(options: Mapping[str, Any], qdq_default: bool | None = None) -> dict[str, Any]:
    """The parsed options of ``max`` (MaxCalibConfig); ``mse`` parses the fields it shares with it here.
    ``qdq_default``: see ``parse_layerwise``.

    Raises:
      UnsupportedError: an unknown or unimplemented option.
    """
    out: dict[str, Any] = {"sync_expert_weight_amax": False, "shared_patterns": None,
                           "skip_forward_without_activation_calib": True, "layerwise": False}
    out.update(parse_layerwise(options.get("layerwise"), qdq_default))
    for k, v in options.items():
        if k not in _MAX_OPTIONS:
            raise UnsupportedError(
                f"max calibration option {k!r} is unknown; known: {', '.join(_MAX_OPTIONS)}"
            )
        if k == "distributed_sync":
            continue
        if k == "sync_expert_weight_amax":
            out[k] = bool(v)
        elif k == "skip_forward_without_activation_calib":
            out[k] = bool(v)
        elif k == "shared_states":
            if v is None:
                continue
            if not isinstance(v, Mapping) or set(v) - {"weight_global_amax"}:
                raise UnsupportedError(
                    f"algorithm.shared_states {v!r}: only 'weight_global_amax' is implemented (as in ModelOpt)"
                )
            pats = (v.get("weight_global_amax") or {}).get("patterns")
            if pats is not None:
                out["shared_patterns"] = tuple(pats)
        elif k == "moe_calib_experts_ratio":
            if v is not None:
                raise UnsupportedError("moe_calib_experts_ratio is not supported yet (jaxquant routes "
                                       "calibration tokens exactly as the model does).")
    return out


def refuse_unknown(options: Mapping[str, Any], known, method: str) -> None:
    """``UnsupportedError`` naming the options of ``method`` that are not in ``known`` (each algorithm's parser)."""
    unknown = sorted(k for k in options if k not in set(known))
    if unknown:
        raise UnsupportedError(f"{method} option(s) {', '.join(map(repr, unknown))} unknown; known: "
                               f"{', '.join(known)}")


def parse_layerwise(v: Any, qdq_default: bool | None = None) -> dict[str, Any]:
    """ModelOpt's ``layerwise`` option (a bool, or ``{enable, checkpoint_dir, save_every, calib_mutates_weights,
    get_qdq_activations_from_prev_layer}``) as ``{"layerwise": bool, "layerwise_checkpoint_dir": str | None,
    "layerwise_save_every": int}``. ``calib_mutates_weights`` needs nothing from an algorithm that leaves the weights
    alone; quantized inputs from the previous layer (``get_qdq_activations_from_prev_layer: true``) and unknown keys
    raise ``UnsupportedError``, unless ``qdq_default`` is a bool (an algorithm that implements both, GPTQ: true by
    default as in ModelOpt), which adds ``"layerwise_qdq"`` (that key's value, or the default)."""
    out = {"layerwise": False, "layerwise_checkpoint_dir": None, "layerwise_save_every": 1}
    if qdq_default is not None:
        out["layerwise_qdq"] = qdq_default
        if isinstance(v, Mapping) and v.get("get_qdq_activations_from_prev_layer") is not None:
            out["layerwise_qdq"] = bool(v["get_qdq_activations_from_prev_layer"])
    if v is None:
        return out
    if not isinstance(v, Mapping):
        out["layerwise"] = bool(v)
        return out
    known = {"enable", "calib_mutates_weights", "checkpoint_dir", "save_every", "get_qdq_activations_from_prev_layer"}
    extra = set(v) - known
    if extra:
        raise UnsupportedError(f"algorithm.layerwise {dict(v)!r}: unknown key(s) {', '.join(sorted(extra))}; "
                               f"known: {', '.join(sorted(known))}")
    if qdq_default is None and v.get("get_qdq_activations_from_prev_layer") and v.get("enable", False):
        raise UnsupportedError("algorithm.layerwise.get_qdq_activations_from_prev_layer: true (each layer calibrated "
                               "on the previous layer's quantized outputs) is not implemented yet.")
    out["layerwise"] = bool(v.get("enable", False))
    out["layerwise_checkpoint_dir"] = v.get("checkpoint_dir")
    save_every = v.get("save_every", 1)
    if not isinstance(save_every, int) or isinstance(save_every, bool) or save_every < 1:
        raise RecipeError(f"algorithm.layerwise.save_every must be a positive integer, got {save_every!r}")
    out["layerwise_save_every"] = save_every
    return out


ALGORITHMS: dict[str, Algorithm] = {
    "max": Algorithm("max", max_mod.max_calibrate, tuple(_MAX_OPTIONS), parse_max_options, early_weights=True),
    "mse": Algorithm("mse", mse_mod.mse_calibrate, (*mse_mod.MSE_DEFAULTS, *mse_mod.SHARED_OPTIONS),
                     mse_mod.parse_options, ("settings", "shared_patterns")),
}

# ---- activation smoothing (calibration/smoothquant.py, calibration/awq.py), GPTQ (calibration/gptq.py)
from jaxquant.calibration import awq as _awq, gptq as _gptq, smoothquant as _smoothquant  # noqa: E402

ALGORITHMS.update({
    "smoothquant": Algorithm("smoothquant", _smoothquant.smoothquant, _smoothquant.OPTIONS, _smoothquant.parse_options,
                             ("options",)),
    "awq_lite": Algorithm("awq_lite", _awq.awq_lite, _awq.OPTIONS, _awq.parse_options, ("options",)),
    "gptq": Algorithm("gptq", _gptq.gptq_calibrate, _gptq.OPTIONS, _gptq.parse_options, ("options",)),
})

# ---- accuracy algorithms on top of max (calibration/local_hessian.py, ...)
from jaxquant.calibration import act_headroom as _act_headroom, awq_clip as _awq_clip  # noqa: E402
from jaxquant.calibration import local_hessian as _local_hessian  # noqa: E402
from jaxquant.calibration import svdquant as _svdquant  # noqa: E402

ALGORITHMS.update({
    "local_hessian": Algorithm("local_hessian", _local_hessian.local_hessian_calibrate,
                               (*_local_hessian.LOCAL_HESSIAN_DEFAULTS, *_local_hessian.SHARED_OPTIONS),
                               _local_hessian.parse_options, ("options",)),
    "nvfp4_act_headroom": Algorithm("nvfp4_act_headroom", _act_headroom.nvfp4_act_headroom, _act_headroom.OPTIONS,
                                    _act_headroom.parse_options, ("options",)),
    "awq_clip": Algorithm("awq_clip", _awq_clip.awq_clip, _awq_clip.OPTIONS, _awq_clip.parse_options, ("options",)),
    "awq_full": Algorithm("awq_full", _awq_clip.awq_full, tuple(dict.fromkeys((*_awq.OPTIONS, *_awq_clip.OPTIONS))),
                          _awq_clip.parse_full_options, ("options",)),
    "svdquant": Algorithm("svdquant", _svdquant.svdquant, _svdquant.OPTIONS, _svdquant.parse_options, ("options",)),
})


def supported_algorithms() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


def get_algorithm(method: str) -> Algorithm:
    """The algorithm registered as ``method``.

    Raises:
      UnsupportedError: any other name (the message lists the supported ones).
    """
    try:
        return ALGORITHMS[method]
    except KeyError:
        what = "is a ModelOpt algorithm that jaxquant does not implement yet" if method in KNOWN_UNSUPPORTED \
            else "is unknown"
        raise UnsupportedError(
            f"calibration algorithm {method!r} {what}; supported: {', '.join(ALGORITHMS)}"
        ) from None


def resolve_algorithm(algorithm: Any) -> tuple[Algorithm | None, dict[str, Any]]:
    """``(Algorithm or None, parsed options)`` for a recipe's ``algorithm`` field; a list is its algorithms in
    sequence (``sequence.py``: an ``Algorithm`` named ``"a+b"``; None when no element calibrates)."""
    if isinstance(algorithm, (list, tuple)):
        from jaxquant.calibration.sequence import parse_sequence, run_sequence

        options = parse_sequence(algorithm)
        if not options["steps"]:
            return None, {}
        name = "+".join(a.name for a, _ in options["steps"])
        return Algorithm(name, run_sequence, run_options=("options",)), options
    method, options = parse_algorithm(algorithm)
    if method is None:
        return None, {}
    algo = get_algorithm(method)
    return algo, (algo.parse(options) if algo.parse is not None else dict(options))


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "KNOWN_UNSUPPORTED",
    "get_algorithm",
    "parse_algorithm",
    "parse_layerwise",
    "parse_max_options",
    "refuse_unknown",
    "resolve_algorithm",
    "supported_algorithms",
]
