"""Checks before and at export: every quantizer calibrated, the model configured as its resolution says,
and the configured model exportable at all (formats, block sizes, fused siblings, KV format, output
quantizers). ``check_exportable`` runs before calibration, so a recipe that cannot be exported fails
before hours of calibration, not after them.
"""

from __future__ import annotations

import logging


from jaxquant import formats
from jaxquant.calibration.finalize import fused_sibling_groups
from jaxquant.calibration.sites import quantizer_sites
from jaxquant.errors import ExportError, UnsupportedError
from jaxquant.export import quant_config as qc
from jaxquant.export.atomic import check_target
from jaxquant.export.linears import config_of, walk

log = logging.getLogger(__name__)


def is_loaded(obj) -> bool:
    """True for a ``LoadedModel`` (a CausalLM also has a ``.model`` attribute: its decoder)."""
    from jaxquant.converters.hf import LoadedModel

    return isinstance(obj, LoadedModel)


def unwrap(obj):
    """The NNX model of a ``LoadedModel``, or ``obj`` itself."""
    return obj.model if is_loaded(obj) else obj


def kv_algo(kv) -> str | None:
    """The one ``kv_cache_quant_algo`` of the attention modules ``{name: {attr: quantizer}}`` (``Walked.kv``)."""
    algos = set()
    for qs in kv.values():
        for role in ("k_bmm_quantizer", "v_bmm_quantizer"):
            algo = qc.kv_cache_algo(config_of(qs.get(role)))
            if algo is not None:
                algos.add(algo)
    if len(algos) > 1:
        raise UnsupportedError(
            f"mixed KV-cache formats {sorted(algos)}: a checkpoint has one kv_cache_quant_algo. "
            "Use one KV format for every layer (ModelOpt asserts the same)."
        )
    return algos.pop() if algos else None


def uncalibrated_quantizers(model_or_loaded, *, weights_only: bool = False, include=None) -> list[str]:
    """ModelOpt names of the enabled quantizers (per expert for stacked ones) that hold no calibrated
    amax: configured by a recipe, but neither calibrated (``quantize``, ``finish_qat``) nor given a
    value (``load_calibration_state``, the loaders). Dynamic and constant-amax quantizers need none.

    This is read from the quantizer state (``TensorQuantizer.UNCALIBRATED``), not guessed from the
    values: an amax of 0 calibrated on all-zero activations counts as calibrated. ``include(quantizer name)``:
    only the quantizers it accepts (one stage of a streamed export).
    """
    out: list[str] = []
    for s in quantizer_sites(unwrap(model_or_loaded)):
        if not s.has_state or (weights_only and s.role != "weight") or (include is not None and not include(s.names[0])):
            continue
        for e in s.quantizer.uncalibrated_instances():
            out.append(s.names[e] if s.stacked else s.names[0])
    return out


def check_calibrated(model_or_loaded, *, weights_only: bool = False, include=None) -> None:
    """``ExportError`` naming the first uncalibrated quantizer (``uncalibrated_quantizers``; ``weights_only``:
    weight quantizers only, for an export started before the activations are calibrated).

    Without it an export of a model that was configured (``apply_recipe``) but not calibrated would
    carry placeholder input / KV scales and look valid.
    """
    bad = uncalibrated_quantizers(model_or_loaded, weights_only=weights_only, include=include)
    if not bad:
        return
    more = f" (and {len(bad) - 1} more quantizer(s))" if len(bad) > 1 else ""
    raise ExportError(
        f"{bad[0]} has no calibrated amax{more}: the model was configured with a recipe but not calibrated, "
        "and an export would carry placeholder scales. Run jaxquant.quantize(...) or load a calibration state "
        "first (jaxquant.load_calibration_state(model, state), or jaxquant ptq --load-calib-state); after QAT "
        "training, run jaxquant.finish_qat(model, ...)."
    )


def _resolution_of(resolution):
    """A ``Resolution``, also from a ``QuantizeResult`` (``.resolution``); None when absent."""
    from jaxquant.recipe.matcher import Resolution

    if resolution is None or isinstance(resolution, Resolution):
        return resolution
    inner = getattr(resolution, "resolution", "absent")
    if inner is None or isinstance(inner, Resolution):
        return inner
    raise ExportError(f"resolution= must be the Resolution returned by apply_recipe (or a QuantizeResult), "
                      f"not {type(resolution).__name__}.")


def check_resolution(model_or_loaded, resolution) -> None:
    """``ExportError`` unless the model's quantizers are configured as ``resolution`` says: the same
    quantizers, enabled or disabled alike, with the same format. Names the first mismatch.

    A mismatch means the resolution is another model's, or the model was re-configured after
    ``apply_recipe`` (another recipe applied, quantizers configured by hand): what the caller believes
    is being exported is not what the quantizers hold.
    """
    from jaxquant.recipe.matcher import format_name

    res = _resolution_of(resolution)
    if res is None:
        return
    sites = quantizer_sites(unwrap(model_or_loaded))
    if res.quantizers:  # apply_recipe: keyed by the quantizers' NNX paths
        expected = dict(res.quantizers)
        found = [(s.path, s.quantizer) for s in sites]
    else:  # recipe.resolve() alone: keyed by ModelOpt names (per expert)
        expected = dict(res.configs)
        found = [(n, s.quantizer) for s in sites for n in s.names]
    seen = set()

    def _fmt(c):
        if c is None or (not isinstance(c, tuple) and not c.enable):
            return None
        return format_name(c)

    for path, q in found:
        seen.add(path)
        if path not in expected:
            raise ExportError(f"resolution mismatch: the model's quantizer {path} is not in the resolution; "
                              "the resolution belongs to another model. Pass the Resolution that apply_recipe "
                              "returned for this model, or none.")
        want, have = _fmt(expected[path]), (q.format if q.enabled else None)
        if want != have:
            raise ExportError(
                f"resolution mismatch at {path}: the resolution says {want or 'disabled'}, the model's quantizer "
                f"is {have or 'disabled'}. The model was configured differently after this resolution was made "
                "(another recipe, or quantizers configured by hand); pass the Resolution of the recipe the model "
                "was calibrated with, or none.")
    extra = [p for p in expected if p not in seen]
    if extra:
        raise ExportError(f"resolution mismatch: the resolution names quantizer {extra[0]}, which the model does "
                          "not have; the resolution belongs to another model.")


def _refuse_svdquant(resolution) -> None:
    """``UnsupportedError`` (``prequant.SVDQUANT_EXPORT``) when the resolution's recipe calibrates with svdquant."""
    from jaxquant.calibration.algorithms import parse_algorithm
    from jaxquant.export.prequant import SVDQUANT_EXPORT

    recipe = getattr(_resolution_of(resolution), "recipe", None)
    algo = getattr(recipe, "algorithm", None)
    steps = algo if isinstance(algo, (list, tuple)) else [algo]
    if any(not isinstance(a, (list, tuple)) and parse_algorithm(a)[0] == "svdquant" for a in steps):
        raise UnsupportedError(f"{getattr(recipe, 'name', None) or 'the recipe'} (svdquant): {SVDQUANT_EXPORT}")


def check_exportable(model_or_loaded, resolution=None, *, export_dir=None, overwrite: bool = False,
                     name_map=None) -> list[str]:
    """Validate, before calibration, that the configured model can be exported.

    ``model_or_loaded``'s quantizers must already carry their configs (after applying the recipe);
    amax values are not needed (``export_hf`` checks them: ``check_calibrated``). ``resolution``
    (optional): the ``Resolution`` of ``apply_recipe`` (or a ``QuantizeResult``); when given, the
    quantizers must be configured as it says (``check_resolution``). Checks: every layer's (weight,
    input) format pair is exportable; NVFP4 weights have
    input dims divisible by 16; fused siblings (q/k/v, gate/up, w1/w3) share one format (serving
    engines fuse them into one GEMM); one KV-cache format; no enabled output quantizer (ModelOpt
    has no export for them); the export target is usable.

    Returns:
      Warnings (also logged): a quantized ``lm_head`` (vLLM rejects ``lm_head.input_scale``,
      vllm#45102), input-only quantization (not exported), an enabled ``q_bmm_quantizer``
      (ModelOpt exports no query scale).

    Raises:
      UnsupportedError / ExportError with the layer name and what to change.
    """
    from jaxquant.recipe.apply import same_structure

    with same_structure():  # a read-only check: the model's modules are walked once, not once per step
        return _check_exportable(model_or_loaded, resolution, export_dir=export_dir, overwrite=overwrite,
                                 name_map=name_map)


def _check_exportable(model_or_loaded, resolution, *, export_dir, overwrite, name_map) -> list[str]:
    model = unwrap(model_or_loaded)
    check_resolution(model, resolution)
    _refuse_svdquant(resolution)
    walked = walk(model, name_map or getattr(model_or_loaded, "name_map", None), need_amax=False)
    warnings: list[str] = []
    fmts: dict[str, str | None] = {}
    for it in walked.linears:
        fmts[it.hf] = it.fmt
        qf = formats.get(it.fmt) if it.fmt is not None else None
        if qf is not None and qf.block_size:
            k = it.weight.shape[-1]
            bs = it.wq.block_size
            if bs != qf.block_size or k % qf.block_size:
                raise ExportError(
                    f"{it.hf}: {qf.quant_algo} export needs blocks of {qf.block_size} along an input dimension "
                    f"divisible by {qf.block_size} (in={k}, block={bs}). Exclude this layer from "
                    f"{qf.quant_algo} in the recipe."
                )
        if it.fmt is None and config_of(it.iq) is not None and it.expert is None:
            warnings.append(f"{it.hf}: only the input quantizer is enabled; ModelOpt exports such a layer "
                            "unquantized (no input_scale).")
        if it.expert is None and it.fmt is not None and it.hf.split(".")[-1] == "lm_head":
            warnings.append("lm_head is quantized: most ModelOpt recipes leave it unquantized, and engines differ on "
                            "a quantized head (vllm#45102 aborted on NVFP4 heads whose exclude_modules also listed "
                            "lm_head, which this export does not write); check that your engine serves it.")
    from jaxquant.export.load_quantized import QuantizedLinear
    from jaxquant.recipe.apply import module_table

    if any(isinstance(m, QuantizedLinear) for m in module_table(model).values()):
        raise UnsupportedError("this model was loaded from a quantized checkpoint (load_quantized): its weights "
                               "are already packed and cannot be exported again; copy the checkpoint directory "
                               "instead, or export from the original model.")
    for s in walked.sites:
        if s.role == "output" and s.config is not None:
            raise UnsupportedError(f"{s.names[0]}: output quantizers cannot be exported to a ModelOpt checkpoint; "
                                   "disable *output_quantizer in the recipe.")
    for group in fused_sibling_groups(list(fmts)):
        members = {name.rpartition(".")[2]: fmts[name] for name in group}
        if len(set(members.values())) > 1:
            parent = group[0].rpartition(".")[0]
            desc = ", ".join(f"{k}={v or 'unquantized'}" for k, v in sorted(members.items()))
            raise UnsupportedError(
                f"{parent}: {desc}. Serving engines fuse {'/'.join(members)} into one GEMM with one format; "
                "give them the same quantizer config in the recipe."
            )
    kv_algo(walked.kv)
    for hf, qs in walked.kv.items():
        if config_of(qs.get("q_bmm_quantizer")) is not None:
            warnings.append(f"{hf}.q_bmm_quantizer is enabled; ModelOpt checkpoints carry no query scale, "
                            "so it is not exported.")
            break
    if export_dir is not None:
        check_target(export_dir, overwrite=overwrite)
    for w in warnings:
        log.warning(w)
    return warnings
