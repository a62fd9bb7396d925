"""Calibration algorithms by name, as a recipe's ``algorithm`` field names them.

The field is ModelOpt's: a string (``"max"``), a mapping with a ``method`` key
(``{"method": "max", "sync_expert_weight_amax": false}``) or None (no calibration). Each algorithm
is an ``Algorithm`` with ``run(model, sites, data, options, **kw) -> CalibrationStats`` and the
finalize options it implies; ``max``, ``smoothquant`` and ``awq_lite`` are implemented (each algorithm module
parses its own options: ``Algorithm.parse``). ``mse`` and ``gptq`` slot in by adding an entry to ``ALGORITHMS``:
each runs ``max`` first in ModelOpt, so they can call ``max_calibrate`` and then refine weights / amax on the same
sites.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxquant.calibration import max as max_mod
from jaxquant.errors import RecipeError, UnsupportedError

#: ModelOpt algorithms jaxquant does not implement yet (for messages).
KNOWN_UNSUPPORTED = ("mse", "local_hessian", "nvfp4_act_headroom", "awq_clip",
                     "awq_full", "svdquant", "gptq", "lsq")

# MaxCalibConfig fields and how jaxquant treats them.
_MAX_OPTIONS = {
    "distributed_sync": "ignored: jaxquant calibrates in one process (a jitted step over all devices)",
    "sync_expert_weight_amax": "honoured",
    "shared_states": "honoured (weight_global_amax.patterns)",
    "skip_forward_without_activation_calib": "honoured",
    "layerwise": "honoured ({enable: true}: calibration/layerwise.py); other keys refused",
    "moe_calib_experts_ratio": "not supported",
}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One calibration method."""

    name: str
    run: Callable[..., Any]
    options: tuple[str, ...] = ()
    #: ``parse(options) -> dict``: the algorithm's own option parser; its result reaches ``run(..., options=...)``.
    parse: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None


def parse_algorithm(algorithm: Any) -> tuple[str | None, dict[str, Any]]:
    """``(method, options)`` from a recipe's ``algorithm`` field.

    Raises:
      RecipeError: a malformed field (a mapping without ``method``, a non-string method).
      UnsupportedError: a list of algorithms (ModelOpt's sequential calibration).
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
        raise UnsupportedError(
            "a list of calibration algorithms (applied in sequence) is not supported yet; use one algorithm."
        )
    raise RecipeError(f"algorithm must be a name, a mapping with 'method', or null; got {algorithm!r}")


def _max_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"sync_expert_weight_amax": False, "shared_patterns": None,
                           "skip_forward_without_activation_calib": True, "layerwise": False}
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
        elif k == "layerwise":
            if isinstance(v, Mapping):
                # calib_mutates_weights: max never changes weights, so either value holds
                extra = set(v) - {"enable", "calib_mutates_weights"}
                if extra and v.get("enable", False):
                    raise UnsupportedError(f"algorithm.layerwise {dict(v)!r}: only 'enable' is implemented "
                                           f"({', '.join(sorted(extra))} not yet: layerwise state is not "
                                           "checkpointed or offloaded).")
                out["layerwise"] = bool(v.get("enable", False))
            else:
                out["layerwise"] = bool(v)
        elif k == "moe_calib_experts_ratio":
            if v is not None:
                raise UnsupportedError("moe_calib_experts_ratio is not supported yet (jaxquant routes "
                                       "calibration tokens exactly as the model does).")
    return out


ALGORITHMS: dict[str, Algorithm] = {
    "max": Algorithm("max", max_mod.max_calibrate, tuple(_MAX_OPTIONS)),
}

# ---- activation smoothing (calibration/smoothquant.py, calibration/awq.py)
from jaxquant.calibration import awq as _awq, smoothquant as _smoothquant  # noqa: E402

ALGORITHMS.update({
    "smoothquant": Algorithm("smoothquant", _smoothquant.smoothquant, _smoothquant.OPTIONS, _smoothquant.parse_options),
    "awq_lite": Algorithm("awq_lite", _awq.awq_lite, _awq.OPTIONS, _awq.parse_options),
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
    """``(Algorithm or None, parsed options)`` for a recipe's ``algorithm`` field."""
    method, options = parse_algorithm(algorithm)
    if method is None:
        return None, {}
    algo = get_algorithm(method)
    if algo.name == "max":
        return algo, _max_options(options)
    if algo.parse is not None:
        return algo, algo.parse(options)
    return algo, dict(options)  # pragma: no cover - future algorithms


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "KNOWN_UNSUPPORTED",
    "get_algorithm",
    "parse_algorithm",
    "resolve_algorithm",
    "supported_algorithms",
]
