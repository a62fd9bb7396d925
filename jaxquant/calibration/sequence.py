"""A list of calibration algorithms applied in sequence (ModelOpt's ``algorithm: [ ... ]``).

ModelOpt's ``QuantizeAlgoCfgType`` is an algorithm (a name, a mapping with ``method``, or null) or a list of them;
``mtq.calibrate`` applies a list as one calibration mode per element, in order, each running its algorithm's
function on the model as the previous one left it (``get_modelike_from_algo_cfg``). A nested list is refused; a null
element is the no-calibration mode (nothing runs). jaxquant does the same: each element is parsed by its own
algorithm's parser (``algorithms.resolve_algorithm``) and run with the same data (a one-shot iterator is read into a
list first). Each step starts from the state the previous one left: activation amax keep their running max (as
ModelOpt's calibrators, which are not reset between modes), smoothing scales stay, weight amax are recalibrated by
every step that calibrates weights. ``finalize`` uses the options of the last algorithm (its ``shared_states``,
``sync_expert_weight_amax``). An empty list calibrates nothing (ModelOpt applies no mode).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxquant.errors import RecipeError, UnsupportedError

#: ``CalibrationStats`` counters summed over the steps.
_SUMMED = ("batches", "tokens", "compile_s", "run_s", "search_s")
#: Algorithms that may follow ``svdquant`` in a list: they only recalibrate amax from the residual weights and the
#: forward (which adds the branch).
AFTER_SVDQUANT = ("max",)
#: Options of a step that ``quantize`` reads at the top level for ``finalize``.
_FINALIZE = ("shared_patterns", "sync_expert_weight_amax")


def parse_sequence(items: Any) -> dict[str, Any]:
    """``{"steps": [(Algorithm, parsed options), ...], <finalize options of the last step>}``.

    Raises:
      RecipeError: a nested list (ModelOpt asserts the same).
      UnsupportedError / RecipeError: an element its algorithm's parser refuses; a step after ``svdquant`` other
        than ``AFTER_SVDQUANT``.
    """
    from jaxquant.calibration.algorithms import resolve_algorithm

    steps = []
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):
            raise RecipeError(f"algorithm[{i}]: nested lists of calibration algorithms are not allowed (ModelOpt "
                              "refuses them too); give one flat list.")
        algo, opts = resolve_algorithm(item)
        if algo is not None:
            if steps and any(a.name == "svdquant" for a, _ in steps) and algo.name not in AFTER_SVDQUANT:
                raise UnsupportedError(
                    f"algorithm[{i}]: {algo.name} after svdquant is not supported: its search would not see "
                    "svdquant's low-rank branch (the weights it quantizes are the residual). Put svdquant last, or "
                    f"follow it only with {' / '.join(AFTER_SVDQUANT)}.")
            steps.append((algo, opts))
    out: dict[str, Any] = {"steps": steps}
    if steps:
        out.update({k: steps[-1][1][k] for k in _FINALIZE if k in steps[-1][1]})
    return out


def run_sequence(model: Any, sites: list, data: Any, *, options: Mapping[str, Any], layerwise: bool = False,
                 **kw):
    """Run each step of ``options["steps"]`` on ``model`` in order (module doc); ``kw``: what ``quantize`` passes an
    algorithm (``forward``, ``progress``, ``total_tokens``, ``max_seq_len``, ``mesh``, layerwise keywords).
    Returns the statistics of all steps (counters summed)."""
    from jaxquant.calibration.max import CalibrationStats

    if isinstance(data, collections.abc.Iterator):
        data = list(data)
    kw.pop("skip_forward_without_activation_calib", None)
    kw.pop("on_weights_calibrated", None)
    ckpt = {k: kw.pop(k) for k in ("layerwise_checkpoint_dir", "layerwise_save_every") if k in kw}
    total = CalibrationStats()
    for algo, opts in options["steps"]:
        step_kw = dict(kw)
        step_kw["skip_forward_without_activation_calib"] = opts.get("skip_forward_without_activation_calib", True)
        if layerwise or opts.get("layerwise"):
            step_kw["layerwise"] = True
            directory = ckpt.get("layerwise_checkpoint_dir") or opts.get("layerwise_checkpoint_dir")
            if directory is not None:
                step_kw["layerwise_checkpoint_dir"] = directory
                step_kw["layerwise_save_every"] = ckpt.get("layerwise_save_every",
                                                           opts.get("layerwise_save_every", 1))
        step_kw.update({k: opts[k] for k in algo.run_options if k in opts})
        if "options" in algo.run_options:
            step_kw["options"] = opts
        stats = algo.run(model, sites, data, **step_kw)
        for k in _SUMMED:
            setattr(total, k, getattr(total, k) + max(getattr(stats, k), 0))
        total.shapes.extend(stats.shapes)
        fields = {f.name for f in dataclasses.fields(stats)}
        for k, v in vars(stats).items():  # an algorithm's extra results (awq_alphas, local_hessians, ...)
            if k not in fields or (k == "resumed" and v is not None):
                setattr(total, k, v)
    return total


__all__ = ["parse_sequence", "run_sequence"]
