"""Export a calibrated jaxquant model as a ModelOpt unified HF checkpoint.

``export_hf(loaded, "out")`` writes what ModelOpt's ``export_hf_checkpoint`` writes for the same
model, weights and amax (spec modelopt.md §5): serving engines with a ModelOpt loader (vLLM,
TensorRT-LLM, SGLang) load the directory as-is.

* Per quantized linear (any module owning a ``weight_quantizer``; HF module name ``…q_proj``): ``weight`` packed/cast, ``weight_scale``,
  ``weight_scale_2`` (NVFP4), ``input_scale`` (when the activations are quantized) — computed by
  the layer's format object (``jaxquant.formats``: the jitted numerics of ``jaxquant.numerics``,
  where the weight lives; formulas and dtypes in docs/export.md). Calibrated KV: ``self_attn.k_proj.k_scale`` /
  ``v_proj.v_scale``; ``*_cast`` KV (constant amax) writes no scale.
* Stacked MoE experts are written per expert with ModelOpt's names
  (``mlp.experts.{e}.gate_proj/up_proj/down_proj`` for Qwen-MoE, ``block_sparse_moe.experts.{e}.w1/w2/w3``
  for Mixtral), quantized or not.
* Everything else keeps its HF name and the source checkpoint's dtype (the model's dtype when the
  source was GGUF); tensors the text model does not own (vision tower, projector, ...) are copied
  byte for byte from the source files.
* Fused siblings (q/k/v, gate/up, expert w1/w3) get one ``weight_scale_2`` and one ``input_scale``
  for NVFP4 (max over the group, ModelOpt's ``preprocess_linear_fusion``), whether or not
  calibration already unified them; FP8 keeps per-module scales (ModelOpt excludes FP8 on purpose).
  MoE inputs: one ``input_scale`` per projection for all experts of a layer (max over experts and,
  for gate/up, over both), and one weight amax for an expert's gate and up — what ModelOpt exports
  for transformers-v5 fused experts.
* ``hf_quant_config.json`` + ``config.json["quantization_config"]`` (``quant_config.py``);
  tokenizer files, chat template and ``generation_config.json`` copied from the source.
* Safetensors sharded above ``max_shard_size`` with ``model.safetensors.index.json``.
* Atomic (``atomic.py``): written into a temporary directory beside the target, renamed at the end.

``check_exportable(model)`` runs the same validation on a configured (not yet calibrated) model, so
a recipe that cannot be exported fails before calibration, not after it. The export itself also
refuses a model whose quantizers were configured but never calibrated (``check_calibrated``: the
scales would be placeholders) and, when a ``resolution`` is passed, a model whose quantizers are not
configured as it says (``check_resolution``).

Where the pieces live: ``linears.py`` walks the model's quantizer sites (any module with a weight
quantizer is a linear: jaxquant's decoders, stacked experts, a user's ``nnx.Linear``), ``checks.py``
validates, ``entries.py`` plans the tensors lazily, ``shards.py`` writes them, ``atomic.py`` publishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.errors import ExportError, JaxquantError
from jaxquant.export import quant_config as qc
from jaxquant.export.atomic import atomic_directory, check_target
from jaxquant.export.checks import (  # noqa: F401 - re-exported: the export API in one place
    check_calibrated,
    check_exportable,
    check_resolution,
    is_loaded,
    uncalibrated_quantizers,
)
from jaxquant.export.entries import _TAG_OF, SCALE_SUFFIXES, DeferredChecks, plan_entries, warm_export_kernels  # noqa: F401
from jaxquant.export.shards import Entry, parse_size, same_inputs, write_sharded
from jaxquant.recipe.apply import same_structure


log = logging.getLogger(__name__)

#: Files copied from the source checkpoint directory (when present).
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
#: Sidecar with the exact activation / KV amax (like ModelOpt's optional modelopt_state): it lets
#: ``load_quantized`` reproduce the calibrated fake-quant model bit for bit, since an FP8 scale
#: ``amax / 448`` does not always determine ``448 / amax``. Engines ignore it.
STATE_FILE = "jaxquant_quant_state.json"


@dataclasses.dataclass
class ExportSummary:
    """What ``export_hf`` wrote."""

    export_dir: Path
    files: list[str]
    total_bytes: int  # bytes of tensor data in the safetensors files
    n_params: int  # logical parameter count (an NVFP4 byte holds two weights)
    dtypes: dict[str, dict[str, int]]  # tag -> {"tensors": n, "bytes": b}
    hf_quant_config: dict[str, Any]
    warnings: list[str]

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.total_bytes / max(self.n_params, 1)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v['tensors']} tensors / {v['bytes'] / 1e6:.1f} MB"
                          for k, v in sorted(self.dtypes.items(), key=lambda kv: -kv[1]["bytes"]))
        return (f"{self.export_dir}: {self.total_bytes / 1e6:.1f} MB in {len(self.files)} file(s), "
                f"{self.n_params / 1e6:.1f} M parameters, {self.bits_per_param:.2f} bits/parameter; {parts}")


def _logical_params(e: Entry) -> int:
    if e.name.endswith(SCALE_SUFFIXES):
        return 0
    n = int(np.prod(e.shape, dtype=np.int64))
    return n * 2 if np.dtype(e.dtype) == np.dtype(np.uint8) and e.name.endswith(".weight") else n


def copy_aux_files(export_dir: Path, source_dir: Path | None, loaded, hf_config: dict) -> None:
    """Copy the source's tokenizer / chat template / generation config files into ``export_dir`` (a GGUF
    source saves its embedded tokenizer); write ``generation_config.json`` from the config if absent."""
    copied = set()
    if source_dir is not None and source_dir.is_dir() and getattr(loaded, "gguf_file", None) is None:
        for name in AUX_FILES:
            p = source_dir / name
            if p.is_file():
                shutil.copy2(p, export_dir / name)
                copied.add(name)
    if getattr(loaded, "gguf_file", None) is not None:  # GGUF: the tokenizer lives in the GGUF metadata
        tok_fn = getattr(loaded, "tokenizer", None)
        if callable(tok_fn):
            try:
                tok_fn().save_pretrained(str(export_dir))
            except Exception as e:  # noqa: BLE001 - a missing tokenizer must not fail the export
                log.warning("could not save the tokenizer into %s (%s); copy it by hand", export_dir, e)
    if not (export_dir / "generation_config.json").exists():
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
        if gen:
            gen["_from_model_config"] = True
            (export_dir / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def _refuse_invalid(tmp: Path) -> None:
    """The exporter's last step before publishing: every ``jaxquant check`` rule must pass."""
    from jaxquant.check import validate_checkpoint

    from jaxquant.check.rules import NO_ENGINE_ALGOS, TRTLLM_ONLY_ALGOS

    report = validate_checkpoint(tmp)
    findings = report.findings
    quant = json.loads((tmp / "hf_quant_config.json").read_text()).get("quantization") or {}
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if str(kv).upper() in TRTLLM_ONLY_ALGOS:  # NVFP4_AFFINE: a KV format ModelOpt writes for TensorRT-LLM
        findings = [f for f in findings if f.rule != "kv-algo-unsupported"]
        log.warning("kv_cache_quant_algo %s: TensorRT-LLM reads this KV cache; vLLM's ModelOpt loader does not (it "
                    "accepts FP8 and NVFP4).", kv)
    if str(algo).upper() in TRTLLM_ONLY_ALGOS + NO_ENGINE_ALGOS:  # formats ModelOpt writes for other readers
        findings = [f for f in findings if f.rule != "quant-algo-unsupported"]
        if str(algo).upper() in TRTLLM_ONLY_ALGOS:
            log.warning("quant_algo %s: nvidia-modelopt writes it for TensorRT-LLM (docs/export.md says, per format, "
                        "what TensorRT-LLM's sources confirm); vLLM's ModelOpt loader does not read it (it accepts FP8, "
                        "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8).", algo)
        else:
            log.warning("quant_algo %s is what nvidia-modelopt writes for this format, but no serving engine's "
                        "ModelOpt loader is known to read it (vLLM's does not; TensorRT-LLM reads W4A8_MXFP4_FP8); "
                        "jaxquant's load_quantized does.", algo)
    if findings:
        shown = "; ".join(f.format() for f in findings[:5])
        more = f"; and {len(findings) - 5} more" if len(findings) > 5 else ""
        raise ExportError(f"the export was not published because it fails the checkpoint validator (the rules of "
                          f"`jaxquant check`, docs/export.md): {shown}{more}. A serving engine would reject or "
                          "mis-serve it; change the recipe accordingly (or report a jaxquant bug if the recipe is "
                          "a standard one).")


def export_hf(
    model_or_loaded,
    export_dir: str | os.PathLike,
    *,
    resolution=None,
    max_shard_size: int | str = "10GB",
    overwrite: bool = False,
    dtype=None,
    hf_config: Mapping[str, Any] | None = None,
    source_dir: str | os.PathLike | None = None,
    allow_unquantized: bool = False,
    progress: bool = False,
) -> ExportSummary:
    """Write a ModelOpt unified HF checkpoint of a calibrated model into ``export_dir``.

    The written directory is validated with ``jaxquant.check.validate_checkpoint`` (the rules of
    ``jaxquant check``) before it is renamed into place: a checkpoint with any finding is never
    published.

    Args:
      model_or_loaded: a ``LoadedModel`` (preferred: it carries the HF config, the source directory
        for tokenizer files and dtypes, and the non-text tensors), or a bare model together with
        ``hf_config=``.
      export_dir: target directory; must be absent or empty unless ``overwrite``.
      resolution: optional: the ``Resolution`` that ``apply_recipe`` returned for this model (or the
        ``QuantizeResult`` of ``quantize``). The quantizers in the model are what is exported; a
        resolution given here is checked against them (the same quantizers, each enabled or disabled
        and of the same format), and any mismatch is an ``ExportError`` naming the first quantizer
        that differs. Use it to make sure the model exported is the one the recipe configured.
      max_shard_size: split the safetensors above this size ("10GB" = 10**10 bytes, like ModelOpt).
      overwrite: replace a non-empty ``export_dir`` (the old one is removed only after success).
      dtype: dtype of unquantized tensors and of ModelOpt's export arithmetic; default: each tensor's
        dtype in the source checkpoint (the model's dtype for GGUF sources).
      allow_unquantized: write a checkpoint even when no quantizer is enabled (a plain HF checkpoint,
        no ``hf_quant_config.json``); by default that is an error, since it is almost always a recipe
        whose patterns matched nothing.
      progress: a tqdm bar of bytes written on stderr (only when stderr is a terminal).

    Returns:
      An ``ExportSummary`` (files, bytes, bits per parameter, dtype table).

    Raises:
      ExportError / UnsupportedError / NonFiniteError naming the layer; ExportError when a quantizer
      was never calibrated (``apply_recipe`` without ``quantize``: the export would carry placeholder
      scales) or ``resolution`` does not match the model. On any failure (also Ctrl-C, disk full)
      ``export_dir`` is left untouched and no partial directory remains.
    """
    plan = plan_export(model_or_loaded, export_dir, resolution=resolution, max_shard_size=max_shard_size,
                       overwrite=overwrite, dtype=dtype, hf_config=hf_config, source_dir=source_dir,
                       allow_unquantized=allow_unquantized)
    return write_export(plan, progress=progress)


@dataclasses.dataclass
class ExportPlan:
    """Everything ``export_hf`` decides before writing: the target, the lazy tensors, the configs."""

    target: Path
    loaded: Any
    source_dir: Path | None
    max_shard_size: int | str
    overwrite: bool
    entries: list[Entry]
    hf_quant_config: dict[str, Any]
    config: dict[str, Any]
    amax: dict[str, float]
    checks: DeferredChecks
    warnings: list[str]
    n_params: int
    total_parameters: int
    dtypes: dict[str, dict[str, int]]


def plan_export(model_or_loaded, export_dir, *, resolution=None, max_shard_size="10GB", overwrite=False, dtype=None,
                hf_config=None, source_dir=None, allow_unquantized=False, activations: bool = True,
                calibrated: bool = True) -> ExportPlan:
    """Validate and plan an export (``export_hf``'s arguments); nothing is written. ``activations`` False: the
    activations are not calibrated yet, so their scales are ``late`` placeholders (``export.early``).
    ``calibrated`` False: the layout of a configured, uncalibrated (even abstract) model, whose entries must not be
    produced (``export.streamed``)."""
    with same_structure():
        return _plan_export(model_or_loaded, export_dir, resolution=resolution, max_shard_size=max_shard_size,
                            overwrite=overwrite, dtype=dtype, hf_config=hf_config, source_dir=source_dir,
                            allow_unquantized=allow_unquantized, activations=activations, calibrated=calibrated)


def _plan_export(model_or_loaded, export_dir, *, resolution, max_shard_size, overwrite, dtype, hf_config, source_dir,
                 allow_unquantized, activations, calibrated) -> ExportPlan:
    loaded = model_or_loaded if is_loaded(model_or_loaded) else None
    cfg = dict(hf_config if hf_config is not None else (getattr(loaded, "hf_config", None) or {}))
    if not cfg:
        raise ExportError("export_hf needs the HF config.json contents: pass a LoadedModel or hf_config=.")
    src = Path(source_dir) if source_dir is not None else getattr(loaded, "source_dir", None)
    target = check_target(export_dir, overwrite=overwrite)
    if src is not None and Path(src).absolute() == target:
        raise ExportError(f"export target {target} is the source checkpoint; choose another --export-path.")
    parse_size(max_shard_size)
    warnings = check_exportable(model_or_loaded, resolution)
    amax: dict[str, float] = {}
    checks = DeferredChecks()
    entries, layers, kv = plan_entries(model_or_loaded, dtype=dtype, source_dir=src, amax_out=amax, checks=checks,
                                       activations=activations, calibrated=calibrated)
    hfq = qc.build_hf_quant_config(layers, kv)
    if not qc.is_quantized_export(hfq) and not allow_unquantized:
        raise ExportError("nothing in this model is quantized (no enabled weight, input or KV quantizer), so the "
                          "export would be a plain copy of the source that looks like a quantized checkpoint's "
                          "output. Check the recipe's patterns, or pass allow_unquantized=True "
                          "(--allow-unquantized).")
    n_params = sum(_logical_params(e) for e in entries)
    total_parameters = sum(int(np.prod(e.shape, dtype=np.int64)) for e in entries if not e.name.endswith(SCALE_SUFFIXES))
    dtypes: dict[str, dict[str, int]] = {}
    for e in entries:
        tag = _TAG_OF.get(np.dtype(e.dtype), str(np.dtype(e.dtype)))
        d = dtypes.setdefault(tag, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += e.nbytes
    cfg.pop("quantization_config", None)
    if "dtype" not in cfg and "torch_dtype" not in cfg:  # GGUF sources: say what the float tensors are
        float_tags = [t for t in ("BF16", "F16", "F32") if t in dtypes]
        if float_tags:
            cfg["dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[float_tags[0]]
    if qc.is_quantized_export(hfq):
        cfg["quantization_config"] = qc.convert_hf_quant_config_format(hfq)
    return ExportPlan(target, loaded, Path(src) if src is not None else None, max_shard_size, overwrite, entries, hfq,
                      cfg, amax, checks, warnings, n_params, total_parameters, dtypes)


def _layout(plan: ExportPlan) -> list[tuple]:
    return [(e.name, tuple(e.shape), np.dtype(e.dtype)) for e in plan.entries]


def write_export(plan: ExportPlan, *, progress: bool = False, final_plan=None) -> ExportSummary:
    """Write a planned export atomically and validate it (``export_hf``).

    ``final_plan`` (``export.early``): ``plan`` was made before the activations were calibrated; every tensor
    but its ``late`` ones is written first, then ``final_plan()`` (which may block until the calibration ends)
    returns the complete plan, whose late tensors, and any tensor whose weight statistics changed since, are
    written into the same files. It must plan the same tensors, or nothing is published."""
    final: list[ExportPlan] = []

    def late():
        p = final_plan()
        if _layout(p) != _layout(plan):
            raise ExportError("internal error: the export planned before the calibration ended does not match the "
                              "final model's tensors; export again without the early start.")
        final.append(p)
        first = {e.name: e for e in plan.entries}
        return [e for e in p.entries if e.late or not same_inputs(first[e.name], e)]

    target = plan.target
    try:
        validate = None if not qc.is_quantized_export(plan.hf_quant_config) else _refuse_invalid
        with atomic_directory(target, overwrite=plan.overwrite, validate=validate) as tmp:
            files = write_sharded(plan.entries, tmp, max_shard_size=plan.max_shard_size,
                                  total_parameters=plan.total_parameters, progress=progress,
                                  late=None if final_plan is None else late)
            plan.checks.finish()  # NaN/Inf in any quantized weight or amax: NonFiniteError, nothing published
            if final:
                final[0].checks.finish()
                plan = final[0]
            hfq = plan.hf_quant_config
            if qc.is_quantized_export(hfq):
                (tmp / "hf_quant_config.json").write_text(json.dumps(hfq, indent=4))
            (tmp / "config.json").write_text(json.dumps(plan.config, indent=4))
            if plan.amax:
                (tmp / STATE_FILE).write_text(json.dumps(
                    {"producer": qc.PRODUCER, "note": "exact calibrated amax behind each input/k/v scale; "
                     "serving engines ignore this file", "amax": plan.amax}, indent=1))
            copy_aux_files(tmp, plan.source_dir, plan.loaded, plan.config)
    except JaxquantError:
        raise
    except KeyboardInterrupt:
        raise
    except OSError as e:
        raise ExportError(f"writing {target} failed ({e}); nothing was left at the target. Free space or "
                          "choose another --export-path and export again (calibration need not be repeated "
                          "if its state was saved).") from e
    summary = ExportSummary(target, files, sum(e.nbytes for e in plan.entries), plan.n_params, plan.dtypes,
                            plan.hf_quant_config, plan.warnings)
    log.info("%s", summary.describe())
    return summary
