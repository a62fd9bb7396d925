"""Export a calibrated jaxquant model as a ModelOpt unified HF checkpoint.

``export_hf(loaded, "out")`` writes what ModelOpt's ``export_hf_checkpoint`` writes for the same
model, weights and amax (spec modelopt.md §5): serving engines with a ModelOpt loader (vLLM,
TensorRT-LLM, SGLang) load the directory as-is.

* Per quantized linear (HF module name ``…q_proj``): ``weight`` packed/cast, ``weight_scale``,
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
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxquant import formats
from jaxquant.errors import (
    CheckpointError,
    ExportError,
    JaxquantError,
    UnsupportedError,
)
from jaxquant.export import quant_config as qc
from jaxquant.export.atomic import atomic_directory, check_target
from jaxquant.export.shards import Entry, parse_size, write_sharded
from jaxquant.formats.base import check_amax

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
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
_TAG_OF = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.uint8): "U8"}
_NP_OF_TAG = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype(np.float64)}


def _is_loaded(obj) -> bool:
    """True for a ``LoadedModel`` (a CausalLM also has a ``.model`` attribute: its decoder)."""
    from jaxquant.converters.hf import LoadedModel

    return isinstance(obj, LoadedModel)


def _unwrap(obj):
    """The NNX model of a ``LoadedModel``, or ``obj`` itself."""
    return obj.model if _is_loaded(obj) else obj


def _val(v) -> Any:
    """The array held by an NNX variable (or the array itself)."""
    if v is None:
        return None
    if hasattr(v, "get_value"):
        return v.get_value()
    return getattr(v, "value", v)


def _np(a) -> np.ndarray:
    return np.asarray(a)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# transformers' module registration order (what ModelOpt's named_modules() walks); the NNX graph
# is walked alphabetically. The order only decides the group numbering of MIXED_PRECISION
# config_groups, which we keep identical to ModelOpt's.
_HF_RANK = {n: i for i, n in enumerate((
    "embed_tokens", "layers", "input_layernorm", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
    "q_norm", "k_norm", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp", "block_sparse_moe",
    "gate", "router", "experts", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "shared_expert",
    "shared_expert_gate", "post_feedforward_layernorm", "norm", "lm_head"))}


def _hf_order_key(name: str):
    return [(0, int(t)) if t.isdigit() else (1, _HF_RANK.get(t, len(_HF_RANK)), t) for t in name.split(".")]


# ----------------------------------------------------------------------------------------------- model walk
@dataclasses.dataclass
class _Linear:
    """One exported linear (a ``Linear`` module, or one expert's projection)."""

    hf: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    weight: Any  # array [out, in]
    bias: Any | None
    wq: Any  # weight TensorQuantizer (or None)
    iq: Any  # input TensorQuantizer (or None)
    fmt: str | None  # ModelOpt format
    w_amax: Any = None  # per-tensor (or per-channel) weight amax, float32
    w_block_amax: Any = None  # static NVFP4 per-block amax
    in_amax: Any = None  # input amax (None: no input_scale)
    expert: tuple[str, int, str] | None = None  # (experts module hf, e, proj) for MoE
    src_weight_name: str | None = None  # where the source dtype is looked up


def _linear_class():
    from jaxquant.models.layers import Linear

    return Linear


def _experts_class():
    try:
        from jaxquant.models.moe import MoeExperts
    except ImportError:  # pragma: no cover
        return None
    return MoeExperts


def _embedding_class():
    from jaxquant.models.layers import Embedding

    return Embedding


def _is_attention(node) -> bool:
    """A module that owns a KV cache's quantizers: ``k_bmm_quantizer`` and ``v_bmm_quantizer``.

    Like ModelOpt (``hasattr(module, "k_bmm_quantizer")``), any module qualifies, not only
    ``layers.Attention``: Gemma 4's ``Gemma4Attention`` (k=v layers without ``v_proj``, KV-shared
    layers without ``k_proj``/``v_proj``) and user-defined attention modules are found too.
    """
    from jaxquant.quantizer import TensorQuantizer

    return isinstance(getattr(node, "k_bmm_quantizer", None), TensorQuantizer) and isinstance(
        getattr(node, "v_bmm_quantizer", None), TensorQuantizer)


def _config_of(q):
    return q.config if (q is not None and q.enabled) else None


def _name_map(model, name_map=None):
    if name_map is not None:
        return name_map
    from jaxquant.converters.names import NameMap

    return NameMap.for_config(model.config)


class _Walked(NamedTuple):
    """The modules export looks at, as ``(hf module name, module)`` lists in model order (one graph walk)."""

    linears: list[tuple[str, Any]]
    experts: list[tuple[str, Any]]
    attentions: list[tuple[str, Any]]
    embeddings: list[tuple[str, Any]]


def _walk(model, name_map) -> _Walked:
    from jaxquant.converters.names import dotted

    Linear, Experts, Embedding = _linear_class(), _experts_class(), _embedding_class()
    out = _Walked([], [], [], [])
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            out.linears.append((name_map.hf_name(dotted(path)), node))
        elif Experts is not None and isinstance(node, Experts):
            out.experts.append((name_map.hf_name(dotted(path)), node))
        elif isinstance(node, Embedding):
            out.embeddings.append((name_map.hf_name(dotted(path)), node))
        elif _is_attention(node):
            out.attentions.append((name_map.hf_name(dotted(path)), node))
    return out


def _layer_format(hf: str, wcfg, icfg) -> str | None:
    try:
        return qc.modelopt_format(wcfg, icfg)
    except UnsupportedError as e:
        raise UnsupportedError(f"{hf}: {e}") from None


def _instance(a, e):
    return None if a is None else np.asarray(a)[e]


def _collect_linears(model, name_map, *, need_amax: bool, walked: _Walked | None = None) -> list[_Linear]:
    lins, exps = (walked or _walk(model, name_map))[:2]
    out: list[_Linear] = []
    for hf, m in lins:
        wcfg, icfg = _config_of(m.weight_quantizer), _config_of(m.input_quantizer)
        fmt = _layer_format(hf, wcfg, icfg)
        item = _Linear(hf, m.weight, m.bias, m.weight_quantizer, m.input_quantizer, fmt, src_weight_name=hf + ".weight")
        if need_amax and fmt is not None:
            qf = formats.get(fmt)
            wq, iq = m.weight_quantizer, m.input_quantizer
            if qf.static_blocks:
                item.w_amax = _np(_val(wq.global_amax)).astype(np.float32).reshape(())
                item.w_block_amax = _np(_val(wq.amax)).astype(np.float32)
            else:
                item.w_amax = _np(_val(wq.amax)).astype(np.float32)
                if not qf.blocked_amax:
                    item.w_amax = item.w_amax.reshape(-1) if qf.per_channel else item.w_amax.reshape(())
            if icfg is not None and qf.static_input_scale and not icfg.is_dynamic:
                fixed = icfg.fixed_amax
                item.in_amax = np.float32(fixed) if fixed is not None else _np(_val(iq.amax)).astype(np.float32).reshape(())
        out.append(item)
    for hf, ex in exps:
        E = ex.num_experts
        for idx, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
            wq = getattr(ex, f"{proj}_weight_quantizer")
            iq = getattr(ex, f"{proj}_input_quantizer")
            wcfg, icfg = _config_of(wq), _config_of(iq)
            name = ex.expert_names[idx]
            fmt = _layer_format(f"{hf}.*.{name}", wcfg, icfg)
            stacked = _val(getattr(ex, proj))
            w_amax = blk = in_amax = None
            if need_amax and fmt is not None:
                qf = formats.get(fmt)
                if qf.static_blocks:
                    w_amax = _np(_val(wq.global_amax)).astype(np.float32).reshape(E)
                    blk = _np(_val(wq.amax)).astype(np.float32)
                else:
                    w_amax = _np(_val(wq.amax)).astype(np.float32).reshape(E, -1)
                    w_amax = w_amax if qf.per_channel else w_amax.reshape(E)
                if icfg is not None and qf.static_input_scale and not icfg.is_dynamic:
                    fixed = icfg.fixed_amax
                    in_amax = (np.full(E, fixed, np.float32) if fixed is not None
                               else _np(_val(iq.amax)).astype(np.float32).reshape(E))
            for e in range(E):
                out.append(_Linear(
                    f"{hf}.{e}.{name}", _Stacked(stacked, e), None, wq, iq, fmt,
                    w_amax=_instance(w_amax, e), w_block_amax=_instance(blk, e),
                    in_amax=None if in_amax is None else in_amax,  # full [E] vector, reduced below
                    expert=(hf, e, proj), src_weight_name=f"{hf}.{e}.{name}.weight",
                ))
    return out


class _Stacked:
    """Lazy view of expert ``e`` of a stacked ``[E, out, in]`` parameter."""

    def __init__(self, stacked, e):
        self.stacked, self.e = stacked, e

    @property
    def shape(self):
        return tuple(self.stacked.shape[1:])

    @property
    def dtype(self):
        return self.stacked.dtype

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.stacked[self.e])
        return a if dtype is None else a.astype(dtype)

    def on_device(self):
        """Expert ``e``'s weight, sliced where the stacked parameter lives (no host copy)."""
        return self.stacked[self.e]


def _device_weight(w):
    """A linear's weight as a jax array where it lives (a ``Param``'s value or an expert slice)."""
    if isinstance(w, _Stacked):
        return w.on_device()
    return jnp.asarray(_val(w))


def _unify(items: list[_Linear]) -> None:
    """Serving-engine fusion: shared weight_scale_2 / input_scale across fused siblings (NVFP4),
    and ModelOpt's fused-experts sharing for MoE (all formats)."""
    by_parent: dict[tuple[str, tuple[str, ...]], list[_Linear]] = collections.defaultdict(list)
    for it in items:
        if it.expert is not None or it.fmt is None:
            continue
        parent, _, leaf = it.hf.rpartition(".")
        for group in _FUSED:
            if leaf in group:
                by_parent[(parent, group)].append(it)
    for members in by_parent.values():
        if len(members) < 2 or members[0].fmt is None or not formats.get(members[0].fmt).shares_fused_scales:
            continue
        if members[0].w_amax is not None:
            m = np.max([np.asarray(x.w_amax) for x in members])
            for x in members:
                x.w_amax = np.float32(m)
        ins = [x.in_amax for x in members if x.in_amax is not None]
        if ins:
            m = np.max([np.asarray(v) for v in ins])
            for x in members:
                if x.in_amax is not None:
                    x.in_amax = np.float32(m)
    # MoE: per layer, input amax shared by all experts (gate/up together), gate/up weight amax per expert.
    moe: dict[str, list[_Linear]] = collections.defaultdict(list)
    for it in items:
        if it.expert is not None:
            moe[it.expert[0]].append(it)
    for members in moe.values():
        gu = [x for x in members if x.expert[2] in ("gate_proj", "up_proj") and x.fmt is not None]
        dn = [x for x in members if x.expert[2] == "down_proj" and x.fmt is not None]
        for grp in (gu, dn):
            ins = [np.max(x.in_amax) for x in grp if x.in_amax is not None]
            if ins:
                m = np.float32(np.max(ins))
                for x in grp:
                    if x.in_amax is not None:
                        x.in_amax = m
        by_e: dict[int, list[_Linear]] = collections.defaultdict(list)
        for x in gu:
            by_e[x.expert[1]].append(x)
        for pair in by_e.values():
            if len(pair) == 2 and pair[0].fmt == pair[1].fmt and not formats.get(pair[0].fmt).per_channel:
                m = np.float32(max(float(np.asarray(p.w_amax)) for p in pair))
                for p in pair:
                    p.w_amax = m


# ----------------------------------------------------------------------------------------------- validation
def _kv_algo(attentions) -> str | None:
    algos = set()
    for _hf, a in attentions:
        for role in ("k_bmm_quantizer", "v_bmm_quantizer"):
            algo = qc.kv_cache_algo(_config_of(getattr(a, role, None)))
            if algo is not None:
                algos.add(algo)
    if len(algos) > 1:
        raise UnsupportedError(
            f"mixed KV-cache formats {sorted(algos)}: a checkpoint has one kv_cache_quant_algo. "
            "Use one KV format for every layer (ModelOpt asserts the same)."
        )
    return algos.pop() if algos else None


def uncalibrated_quantizers(model_or_loaded) -> list[str]:
    """ModelOpt names of the enabled quantizers (per expert for stacked ones) that hold no calibrated
    amax: configured by a recipe, but neither calibrated (``quantize``, ``finish_qat``) nor given a
    value (``load_calibration_state``, the loaders). Dynamic and constant-amax quantizers need none.

    This is read from the quantizer state (``TensorQuantizer.UNCALIBRATED``), not guessed from the
    values: an amax of 0 calibrated on all-zero activations counts as calibrated.
    """
    from jaxquant.calibration.sites import quantizer_sites

    out: list[str] = []
    for s in quantizer_sites(_unwrap(model_or_loaded)):
        if not s.has_state:
            continue
        for e in s.quantizer.uncalibrated_instances():
            out.append(s.names[e] if s.stacked else s.names[0])
    return out


def check_calibrated(model_or_loaded) -> None:
    """``ExportError`` naming the first uncalibrated quantizer (``uncalibrated_quantizers``).

    Without it an export of a model that was configured (``apply_recipe``) but not calibrated would
    carry placeholder input / KV scales and look valid.
    """
    bad = uncalibrated_quantizers(model_or_loaded)
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
    from jaxquant.calibration.sites import quantizer_sites
    from jaxquant.recipe.matcher import format_name

    res = _resolution_of(resolution)
    if res is None:
        return
    sites = quantizer_sites(_unwrap(model_or_loaded))
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
    model = _unwrap(model_or_loaded)
    check_resolution(model, resolution)
    nm = name_map or getattr(model_or_loaded, "name_map", None) or _name_map(model)
    warnings: list[str] = []
    walked = _walk(model, nm)
    items = _collect_linears(model, nm, need_amax=False, walked=walked)
    fmts: dict[str, str | None] = {}
    for it in items:
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
        if it.fmt is None and _config_of(it.iq) is not None and it.expert is None:
            warnings.append(f"{it.hf}: only the input quantizer is enabled; ModelOpt exports such a layer "
                            "unquantized (no input_scale).")
        if it.expert is None and it.fmt is not None and it.hf.split(".")[-1] == "lm_head":
            warnings.append("lm_head is quantized: vLLM cannot load a quantized lm_head from ModelOpt checkpoints "
                            "(vllm#45102); ModelOpt's recipes exclude it.")
    from jaxquant.export.load_quantized import QuantizedLinear

    if any(isinstance(n, QuantizedLinear) for _, n in nnx.iter_graph(model)):
        raise UnsupportedError("this model was loaded from a quantized checkpoint (load_quantized): its weights "
                               "are already packed and cannot be exported again; copy the checkpoint directory "
                               "instead, or export from the original model.")
    lins, exps, atts, _ = walked
    for hf, m in lins:
        if _config_of(m.output_quantizer) is not None:
            raise UnsupportedError(f"{hf}: output quantizers cannot be exported to a ModelOpt checkpoint; "
                                   "disable *output_quantizer in the recipe.")
    for hf, ex in exps:
        for p in ("gate_proj", "up_proj", "down_proj"):
            if _config_of(getattr(ex, f"{p}_output_quantizer")) is not None:
                raise UnsupportedError(f"{hf}: expert output quantizers cannot be exported.")
    groups: dict[tuple[str, tuple[str, ...]], dict[str, str | None]] = collections.defaultdict(dict)
    for name, fmt in fmts.items():
        parent, _, leaf = name.rpartition(".")
        for group in _FUSED:
            if leaf in group:
                groups[(parent, group)][leaf] = fmt
    for (parent, group), members in groups.items():
        if len(members) > 1 and len(set(members.values())) > 1:
            desc = ", ".join(f"{k}={v or 'unquantized'}" for k, v in sorted(members.items()))
            raise UnsupportedError(
                f"{parent}: {desc}. Serving engines fuse {'/'.join(group)} into one GEMM with one format; "
                "give them the same quantizer config in the recipe."
            )
    _kv_algo(atts)
    for hf, a in atts:
        if _config_of(getattr(a, "q_bmm_quantizer", None)) is not None:
            warnings.append(f"{hf}.q_bmm_quantizer is enabled; ModelOpt checkpoints carry no query scale, "
                            "so it is not exported.")
            break
    if export_dir is not None:
        check_target(export_dir, overwrite=overwrite)
    for w in warnings:
        log.warning(w)
    return warnings


# ----------------------------------------------------------------------------------------------- source info
class _SourceDtypes:
    """What the source safetensors checkpoint says about each tensor: its dtype tag (by canonical
    HF name) and its name layout. Checkpoints written in an older layout (Gemma 3's
    ``language_model.model.*``, which transformers v5 still writes back on save) are exported in
    that same layout, as ModelOpt reverts to the hub names."""

    def __init__(self, source_dir: Path | None, name_map, gguf: bool):
        self.tags: dict[str, str] = {}
        self.reverse: list[tuple[str, str]] = []  # (canonical prefix, source prefix)
        if source_dir is None or gguf:
            return
        try:
            from jaxquant.io.safetensors import CheckpointFiles

            files = CheckpointFiles.open(source_dir)
        except (CheckpointError, OSError):
            return
        keys = list(files.keys())
        for k in keys:
            self.tags[name_map.canonical(k)] = files.tensor_info(k).dtype
        for old, new in getattr(name_map, "legacy_renames", ()):
            if any(k.startswith(old) for k in keys) and not any(k.startswith(new) for k in keys):
                self.reverse.append((new, old))

    def rename(self, name: str) -> str:
        """The source layout's name for a canonical (transformers v5) name."""
        for new, old in self.reverse:
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def dtype(self, name: str, fallback) -> np.dtype:
        tag = self.tags.get(name)
        if tag is None:
            # HF v5 fused experts: mlp.experts.0.gate_proj.weight <- mlp.experts.gate_up_proj
            m = re.match(r"(.*\.experts)\.\d+\.(\w+)\.weight$", name)
            if m:
                fused = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "w1": "gate_up_proj",
                         "w3": "gate_up_proj", "down_proj": "down_proj", "w2": "down_proj"}.get(m.group(2))
                tag = self.tags.get(f"{m.group(1)}.{fused}") if fused else None
        if tag in _NP_OF_TAG:
            return _NP_OF_TAG[tag]
        return np.dtype(fallback)


# ----------------------------------------------------------------------------------------------- entries
class _Once:
    """Compute a layer's export tensors once, hand them out by key, free them when all are taken.

    Thread-safe: the shard writer may call the entries of one layer from several threads."""

    def __init__(self, fn, keys):
        self.fn, self.left, self.out = fn, set(keys), None
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if self.out is None:
                self.out = self.fn()
            a = self.out[key]
            self.left.discard(key)
            if not self.left:
                self.out = None
            return a


class DeferredChecks:
    """The finiteness checks of the layers produced so far, run without stalling the device.

    ``poll()`` runs the checks whose results the device has finished (``NonFiniteError`` naming the
    first bad tensor), ``finish()`` all of them (blocking): ``export_hf`` calls it after the last
    tensor is written and before the directory is published, so a NaN weight never reaches a
    published checkpoint, while producing the next layer never waits for a read-back."""

    def __init__(self):
        self.pending: list = []
        self.lock = threading.Lock()

    def add(self, check) -> None:
        with self.lock:
            self.pending.append(check)

    def poll(self) -> None:
        with self.lock:
            done = [c for c in self.pending if c.ready()]
            self.pending = [c for c in self.pending if c not in done]
        for c in done:
            c()

    def finish(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for c in pending:
            c()


def _linear_entries(it: _Linear, export_dtype: np.dtype, checks: DeferredChecks | None = None) -> list[Entry]:
    """Export entries of one quantized linear (weight + scales; bias handled with the params).

    Shapes and dtypes come from the format's ``export_specs``; the values from its jitted
    ``export_tensors``, computed where the weight lives on the first ``produce()`` of the layer
    (they are jax arrays: the shard writer copies them to the host). With ``checks`` the
    finiteness check is deferred to it (no read-back in ``produce()``); without, it runs at once."""
    qf = formats.get(it.fmt)
    out_dim, in_dim = tuple(it.weight.shape)
    specs = qf.export_specs(out_dim, in_dim, input_scale=it.in_amax is not None)

    def compute():
        kw = {"block_amax": it.w_block_amax, "in_amax": it.in_amax, "compute_dtype": export_dtype,
              "what": it.hf + ".weight"}
        if checks is None:
            return qf.export_tensors(_device_weight(it.weight), it.w_amax, **kw)
        checks.poll()
        out, check = qf.export_tensors_deferred(_device_weight(it.weight), it.w_amax, **kw)
        checks.add(check)
        return out

    once = _Once(compute, [k for k, _, _ in specs])
    return [Entry(f"{it.hf}.{k}", s, d, (lambda k=k: once.get(k))) for k, s, d in specs]


def warm_export_kernels(model, dtype, *, name_map=None) -> int:
    """Compile the export kernels ``model``'s quantized linears will need, by running each distinct one once on
    zeros (so JAX's own cache holds them when ``export_hf`` calls them). ``model`` may be abstract (built with
    ``abstract_model``, the recipe applied, nothing calibrated): only shapes, dtypes and formats are read.
    ``dtype`` is the export dtype of the weights. Returns how many kernels ran. Used by ``calibration.ahead``
    while the checkpoint loads; a kernel that turns out different at export is simply compiled then.
    """
    nm = _name_map(model, name_map)
    seen = set()
    dtype = np.dtype(dtype)
    for it in _collect_linears(model, nm, need_amax=True):
        if it.fmt is None:
            continue
        key = (it.fmt, tuple(it.weight.shape), it.in_amax is None, it.w_block_amax is None,
               np.shape(it.w_amax), np.shape(it.in_amax), np.shape(it.w_block_amax))
        if key in seen:
            continue
        seen.add(key)
        out, _ = formats.get(it.fmt).export_tensors_deferred(
            jnp.zeros(tuple(it.weight.shape), dtype), it.w_amax, block_amax=it.w_block_amax, in_amax=it.in_amax,
            compute_dtype=dtype, what=it.hf + ".weight")
        jax.block_until_ready(out)
    return len(seen)


def _cast_entry(name: str, arr, dtype: np.dtype) -> Entry:
    def produce():
        a = np.asarray(arr)
        return a if a.dtype == dtype else a.astype(dtype)

    return Entry(name, tuple(arr.shape), np.dtype(dtype), produce)


def _np_dtype(a) -> np.dtype:
    return np.dtype(a.dtype)


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


def plan_entries(model_or_loaded, *, dtype=None, name_map=None, source_dir=None, gguf: bool | None = None,
                 extra_tensors: Mapping[str, Any] | None = None,
                 amax_out: dict[str, float] | None = None,
                 checks: DeferredChecks | None = None) -> tuple[list[Entry], dict[str, Any], str | None]:
    """The exported tensors (lazy) plus the per-layer formats and KV algo, without writing anything.

    ``checks`` (a ``DeferredChecks``), when given, collects the quantized layers' finiteness checks
    instead of each ``produce()`` waiting for its own; call ``checks.finish()`` after writing.
    ``amax_out``, when given, receives the exact activation / KV amax behind each exported
    ``input_scale`` / ``k_scale`` / ``v_scale`` (dense linears and attention; by quantizer name).

    Returns ``(entries, layers, kv_algo)`` where ``layers`` is ``{hf module: (format, block)}``.

    Raises:
      ExportError: a quantizer holds no calibrated amax (``check_calibrated``).
    """
    from jaxquant.converters.names import dotted

    model = _unwrap(model_or_loaded)
    check_calibrated(model)
    nm = name_map or getattr(model_or_loaded, "name_map", None) or _name_map(model)
    if source_dir is None:
        source_dir = getattr(model_or_loaded, "source_dir", None)
    if gguf is None:
        gguf = getattr(model_or_loaded, "gguf_file", None) is not None
    if extra_tensors is None:
        extra_tensors = getattr(model_or_loaded, "extra_tensors", None) or {}
    src = _SourceDtypes(Path(source_dir) if source_dir is not None else None, nm, gguf)
    fixed_dtype = np.dtype(dtype) if dtype is not None else None

    walked = _walk(model, nm)
    items = _collect_linears(model, nm, need_amax=True, walked=walked)
    _unify(items)
    by_weight = {it.hf + ".weight": it for it in items if it.expert is None}
    lins, exps, atts, embs = walked
    kv = _kv_algo(atts)

    entries: list[Entry] = []
    # ---- parameters of the NNX model (everything but stacked experts)
    expert_param_paths = set()
    for hf, _ex in exps:
        for p in ("gate_proj", "up_proj", "down_proj"):
            expert_param_paths.add(f"{hf}.{p}")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = nm.hf_name(dotted(path))
        if name in expert_param_paths:
            continue
        arr = _val(var)
        target = fixed_dtype or src.dtype(name, _np_dtype(arr))
        it = by_weight.get(name)
        if it is not None and it.fmt is not None:
            entries.extend(_linear_entries(it, target, checks))
        else:
            entries.append(_cast_entry(name, arr, target))
    # ---- experts, per expert
    if amax_out is not None:
        for it in items:
            if it.expert is None and it.fmt is not None and it.in_amax is not None:
                amax_out[src.rename(it.hf + ".input_quantizer")] = float(np.float32(it.in_amax))
            if it.expert is None and it.fmt is not None and formats.get(it.fmt).sidecar_weight_amax:
                amax_out[src.rename(it.hf + ".weight_quantizer")] = float(np.float32(it.w_amax))
    for it in items:
        if it.expert is None:
            continue
        target = fixed_dtype or src.dtype(it.src_weight_name, _np_dtype(it.weight))
        if it.fmt is not None:
            entries.extend(_linear_entries(it, target, checks))
        else:
            entries.append(_cast_entry(it.hf + ".weight", it.weight, target))
    # ---- KV scales
    for hf, a in atts:
        for role, proj, key in (("k_bmm_quantizer", "k_proj", "k_scale"), ("v_bmm_quantizer", "v_proj", "v_scale")):
            q = getattr(a, role, None)
            cfg = _config_of(q)
            if cfg is None or cfg.fixed_amax is not None or cfg.is_dynamic:
                continue
            amax = _np(_val(q.amax)).astype(np.float32)
            check_amax(np.max(amax), f"{hf}.{role} amax")
            val = formats.kv_scale(np.max(amax)).reshape(())
            if amax_out is not None:
                amax_out[src.rename(f"{hf}.{role}")] = float(np.max(amax))
            entries.append(Entry(f"{hf}.{proj}.{key}", (), np.dtype(np.float32), lambda v=val: v))
    # ---- tensors the text model does not own, byte for byte
    taken = {e.name for e in entries}
    for name, lazy in extra_tensors.items():
        if name in taken:
            continue
        tag = getattr(lazy, "dtype", None)
        shape = tuple(lazy.shape)
        from jaxquant.io.safetensors import DTYPES

        np_dtype = DTYPES[tag] if isinstance(tag, str) else np.dtype(tag if tag is not None else np.asarray(lazy).dtype)
        entries.append(Entry(name, shape, np_dtype, (lambda t=lazy: t.get() if hasattr(t, "get") else np.asarray(t))))
    if src.reverse:
        entries = [dataclasses.replace(e, name=src.rename(e.name)) for e in entries]
    entries.sort(key=lambda e: _natural_key(e.name))
    layers: dict[str, tuple[str | None, int]] = {}
    # ModelOpt attaches (disabled) quantizers to embeddings too, so they are listed as unquantized; but
    # not to Gemma's scaled embeddings (``Gemma3/4TextScaledWordEmbedding`` subclass nn.Embedding, and
    # ModelOpt's registry quantizes exact classes only), which therefore stay out of exclude_modules.
    for hf, node in embs:
        if node.scale is None:
            layers[hf] = (None, 0)
    for it in items:
        layers[it.hf] = (it.fmt, formats.get(it.fmt).block_size if it.fmt is not None else 0)
    if getattr(model, "lm_head", "absent") is None:
        layers.setdefault("lm_head", (None, 0))  # tied: ModelOpt still lists the (tied) lm_head Linear
    layers = {src.rename(k + ".")[:-1]: layers[k] for k in sorted(layers, key=_hf_order_key)}
    return entries, layers, kv


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

    from jaxquant.check.rules import TRTLLM_ONLY_ALGOS

    report = validate_checkpoint(tmp)
    findings = report.findings
    algo = (json.loads((tmp / "hf_quant_config.json").read_text()).get("quantization") or {}).get("quant_algo")
    if algo in TRTLLM_ONLY_ALGOS:  # a format jaxquant exports for TensorRT-LLM: publish, and say vLLM cannot serve it
        findings = [f for f in findings if f.rule != "quant-algo-unsupported"]
        log.warning("quant_algo %s: TensorRT-LLM serves this checkpoint; vLLM's ModelOpt loader does not (it "
                    "accepts FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8).", algo)
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
    loaded = model_or_loaded if _is_loaded(model_or_loaded) else None
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
    entries, layers, kv = plan_entries(model_or_loaded, dtype=dtype, source_dir=src, amax_out=amax, checks=checks)
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
    try:
        validate = None if not qc.is_quantized_export(hfq) else _refuse_invalid
        with atomic_directory(target, overwrite=overwrite, validate=validate) as tmp:
            files = write_sharded(entries, tmp, max_shard_size=max_shard_size, total_parameters=total_parameters,
                                  progress=progress)
            checks.finish()  # NaN/Inf in any quantized weight or amax: NonFiniteError, nothing published
            if qc.is_quantized_export(hfq):
                (tmp / "hf_quant_config.json").write_text(json.dumps(hfq, indent=4))
            (tmp / "config.json").write_text(json.dumps(cfg, indent=4))
            if amax:
                (tmp / STATE_FILE).write_text(json.dumps(
                    {"producer": qc.PRODUCER, "note": "exact calibrated amax behind each input/k/v scale; "
                     "serving engines ignore this file", "amax": amax}, indent=1))
            copy_aux_files(tmp, Path(src) if src is not None else None, loaded, cfg)
    except JaxquantError:
        raise
    except KeyboardInterrupt:
        raise
    except OSError as e:
        raise ExportError(f"writing {target} failed ({e}); nothing was left at the target. Free space or "
                          "choose another --export-path and export again (calibration need not be repeated "
                          "if its state was saved).") from e
    summary = ExportSummary(target, files, sum(e.nbytes for e in entries), n_params, dtypes, hfq, warnings)
    log.info("%s", summary.describe())
    return summary
