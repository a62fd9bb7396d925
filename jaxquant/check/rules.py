"""The rules: what vLLM's ModelOpt loader (``vllm/model_executor/layers/quantization/modelopt.py``)
and ModelOpt's own exporter require of a unified HF checkpoint. Each ``check_*`` function takes
the ``View`` of an opened checkpoint and returns findings; none of them writes anything.

docs/export.md ("Checking a checkpoint") lists every rule id with the vLLM source line behind it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterable
from fnmatch import translate as fnmatch_translate
from typing import Any

import numpy as np

from jaxquant.check.reader import Checkpoint, scan
from jaxquant.check.report import Finding

#: quant_algo values vLLM's ModelOpt loader accepts (modelopt.py QUANT_ALGOS).
VLLM_QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8",
                    "MIXED_PRECISION")
#: kv_cache_quant_algo values vLLM accepts (modelopt.py KV_CACHE_QUANT_ALGOS).
VLLM_KV_ALGOS = ("FP8", "NVFP4")
#: Per-layer algos of MIXED_PRECISION that every vLLM with ModelOptMixedPrecisionConfig serves
#: (linears and MoE alike; vLLM 0.33 accepts more for dense linears only).
MIXED_LAYER_ALGOS = ("FP8", "NVFP4", "W4A16_NVFP4")
#: Algorithms nvidia-modelopt writes that vLLM's ModelOpt loader rejects but TensorRT-LLM reads.
TRTLLM_ONLY_ALGOS = ("W4A16_AWQ", "W4A8_AWQ", "W8A16", "W8A8_SQ_PER_CHANNEL", "NVFP4_AWQ", "W4A8_NVFP4_FP8",
                     "W4A8_MXFP4_FP8", "NVFP4_SVD", "INT8", "NVFP4_AFFINE")
#: Algorithms nvidia-modelopt writes that no serving engine's ModelOpt loader is known to read (``jaxquant`` exports
#: them with a warning; ``load_quantized`` reads them).
NO_ENGINE_ALGOS = ("MXFP4",)
_FAMILY = {"FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8", "FP8_PB_WO": "fp8", "MXFP8": "fp8", "NVFP4": "nvfp4",
           "W4A16_NVFP4": "nvfp4", "W4A8_NVFP4_FP8": "nvfp4", "MXFP4": "nvfp4", "W4A8_MXFP4_FP8": "nvfp4",
           "W8A16": "other", "W8A8_SQ_PER_CHANNEL": "other", "W4A16_AWQ": "nvfp4",
           "W4A8_AWQ": "nvfp4", "NVFP4_AWQ": "nvfp4"}  # "nvfp4": U8 nibbles, "other": I8
_STATIC_INPUT = {"FP8": "optional", "NVFP4": "required", "W4A8_NVFP4_FP8": "required", "W4A8_MXFP4_FP8": "required",
                 "W8A8_SQ_PER_CHANNEL": "required", "W4A8_AWQ": "required",
                 "NVFP4_AWQ": "optional"}  # NVFP4_AWQ: W4A4 or weights only; the others take no input_scale
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
_VISION = ("vision_tower", "vision_model", "vit_large_projector")  # vLLM never quantizes these
_ENCODERS = _VISION + ("visual.", "audio_tower", "audio_model", "audio_encoder")  # no KV cache
_FLOAT = ("BF16", "F16", "F32", "F64")
_EXPERT = re.compile(r"\.experts\.\d+\.")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
HQ = "hf_quant_config.json"
CQ = "config.json:quantization_config"


@dataclasses.dataclass
class Linear:
    """A linear module of the checkpoint: its weight tensor and the format its tensors show."""

    module: str
    tag: str | None  # weight dtype tag; None for a tied lm_head (no tensor)
    shape: tuple[int, ...]
    family: str | None  # "nvfp4" | "fp8" | "other" (a quantized tag jaxquant does not know) | None (unquantized)

    @property
    def expert(self) -> bool:
        return bool(_EXPERT.search(self.module + "."))


@dataclasses.dataclass
class View:
    """What the rules read: the opened checkpoint plus its declared quantization."""

    ck: Checkpoint
    q: dict[str, Any]  # the "quantization" block (hf_quant_config.json, else config.json's translated)
    algo: str | None
    kv: str | None
    exclude: list[str]
    layers: dict[str, dict[str, Any]]  # MIXED_PRECISION quantized_layers
    linears: dict[str, Linear]
    modules: set[str]
    declared: bool  # some config declares a quantization

    @property
    def mixed(self) -> bool:
        return self.algo == "MIXED_PRECISION"

    def has(self, name: str) -> bool:
        return name in self.ck.infos

    def tag(self, name: str) -> str:
        return self.ck.infos[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ck.infos[name].shape


# ----------------------------------------------------------------------------------------------- the view
def _upper(v) -> str | None:
    return str(v).upper() if v else None


def _from_config_json(qc: dict[str, Any]) -> dict[str, Any]:
    """config.json's quantization_config read as vLLM's compressed-tensors-style branch reads it."""
    kv = qc.get("kv_cache_scheme")
    if isinstance(kv, dict):
        kv = "FP8" if kv.get("type") == "float" and kv.get("num_bits") == 8 else None
    out = {"quant_algo": qc.get("quant_algo"), "kv_cache_quant_algo": kv,
           "exclude_modules": qc.get("ignore", qc.get("exclude_modules", []))}
    gs = qc.get("group_size", _group_size_of_groups(qc))
    if gs is not None:
        out["group_size"] = gs
    if "quantized_layers" in qc:
        out["quantized_layers"] = qc["quantized_layers"]
    return out


def _group_size_of_groups(qc: dict[str, Any]) -> int | None:
    for g in (qc.get("config_groups") or {}).values():
        w = g.get("weights") if isinstance(g, dict) else None
        if isinstance(w, dict) and w.get("group_size") is not None:
            return w["group_size"]
    return None


def _family(ck: Checkpoint, mod: str, tag: str) -> str | None:
    if tag in _FLOAT:
        return None
    if tag == "U8":
        return "nvfp4"
    if tag == "F8_E4M3":
        return "fp8"
    return "other"


def build_view(ck: Checkpoint) -> View:
    """Collect linears, module names and the declared quantization of ``ck``."""
    cq = ck.config.get("quantization_config")
    if ck.hf_quant is not None:
        q = ck.hf_quant.get("quantization")
        q = q if isinstance(q, dict) else {}
    elif isinstance(cq, dict):
        q = _from_config_json(cq)
    else:
        q = {}
    declared = ck.hf_quant is not None or isinstance(cq, dict)
    linears: dict[str, Linear] = {}
    modules: set[str] = set()
    for name, info in ck.infos.items():
        parts = name.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts)))
        if not name.endswith(".weight"):
            continue
        mod = name[: -len(".weight")]
        last = mod.rsplit(".", 1)[-1]
        quantized_tag = info.dtype not in _FLOAT
        if len(info.shape) != 2 and not quantized_tag:
            continue
        if not quantized_tag and ("embed" in last or "norm" in last):
            continue
        linears[mod] = Linear(mod, info.dtype, info.shape, _family(ck, mod, info.dtype))
    if not any(m == "lm_head" or m.endswith(".lm_head") for m in linears):
        linears["lm_head"] = Linear("lm_head", None, (), None)  # tied: vLLM still builds an lm_head
        modules.add("lm_head")
    exclude = q.get("exclude_modules")
    layers = q.get("quantized_layers")
    return View(ck, q, _upper(q.get("quant_algo")), _upper(q.get("kv_cache_quant_algo")),
                list(exclude) if isinstance(exclude, list) else [],
                dict(layers) if isinstance(layers, dict) else {}, linears, modules, declared)


def vllm_excluded(prefix: str, patterns: Iterable[str]) -> bool:
    """vLLM's ``is_layer_excluded``: exact name, substring (ModelOpt < 0.39 lists), or fnmatch wildcard."""
    return _matcher(tuple(patterns))(prefix)


@functools.lru_cache(maxsize=8)
def _matcher(patterns: tuple[str, ...]):
    """``vllm_excluded`` for a fixed pattern list: substrings plus one compiled regex of all wildcards
    (a 30B MoE has ~20k linears and ~100 entries)."""
    subs = tuple(p for p in patterns if isinstance(p, str))
    if not subs:
        return lambda prefix: False
    sub_rx = re.compile("|".join(re.escape(p) for p in subs))
    wild_rx = re.compile("|".join(f"(?:{fnmatch_translate(p)})" for p in subs))
    cache: dict[str, bool] = {}

    def match(prefix: str) -> bool:
        hit = cache.get(prefix)
        if hit is None:
            hit = cache[prefix] = sub_rx.search(prefix) is not None or wild_rx.match(prefix) is not None
        return hit

    return match


def _vllm_rewritten(patterns: Iterable[str]) -> list[str]:
    """``apply_vllm_mapper``'s rewrite of ``path*`` into ``path`` + ``path.*`` (vllm#28072)."""
    out = []
    for p in patterns:
        out.extend([p[:-1], p[:-1] + ".*"] if len(p) >= 2 and p[-1] == "*" and p[-2] != "." else [p])
    return out


_EXPERT_PROJ = re.compile(r"(.*\.experts)\.\d+\.[^.]+$")


def quantized_layer_entry(layers: dict[str, Any], module: str) -> Any:
    """The ``quantized_layers`` entry that covers ``module`` (an HF module name), or None: its own, else, for one
    expert's projection (``....experts.<e>.<proj>``), its experts module's (``....experts``), which is how ModelOpt
    lists fused MoE experts and where vLLM's fused-MoE layer looks itself up."""
    entry = layers.get(module)
    if entry is None:
        m = _EXPERT_PROJ.match(module)
        if m is not None:
            entry = layers.get(m.group(1))
    return entry


def declared_algo(v: View, mod: str) -> str | None:
    """The algo vLLM will run ``mod`` with (None: unquantized)."""
    if vllm_excluded(mod, v.exclude):
        return None
    if v.mixed:
        entry = quantized_layer_entry(v.layers, mod)
        return _upper(entry.get("quant_algo")) if isinstance(entry, dict) else None
    return v.algo


def _group_size(v: View, mod: str) -> int:
    entry = quantized_layer_entry(v.layers, mod) if v.mixed else v.q
    gs = entry.get("group_size") if isinstance(entry, dict) else None
    try:
        return int(gs) if gs else 16
    except (TypeError, ValueError):
        return 16


# ----------------------------------------------------------------------------------------------- config rules
def check_config(v: View) -> list[Finding]:
    """quant_algo / kv algo supported, MIXED_PRECISION layers, required keys, config.json agreement."""
    out: list[Finding] = []
    hq = v.ck.hf_quant
    src = HQ if hq is not None else CQ
    if v.algo is None and v.declared:
        out.append(Finding(f"{src}:quant_algo", "quant-algo-unsupported",
                           "quant_algo is null (KV-cache-only quantization): vLLM's ModelOpt loader raises "
                           "\"Missing 'quant_algo'\". Quantize the linears too, or serve the KV-only "
                           "checkpoint with TensorRT-LLM."))
    elif v.algo is not None and v.algo not in VLLM_QUANT_ALGOS:
        where = ("nvidia-modelopt writes it and TensorRT-LLM reads it" if v.algo in TRTLLM_ONLY_ALGOS
                 else "no ModelOpt loader (vLLM, TensorRT-LLM, SGLang) knows it")
        out.append(Finding(f"{src}:quant_algo", "quant-algo-unsupported",
                           f"quant_algo {v.algo!r} is not one of vLLM's {list(VLLM_QUANT_ALGOS)} ({where}). "
                           "Re-export with an FP8 or NVFP4 recipe to serve it with vLLM."))
    if v.kv is not None and v.kv not in VLLM_KV_ALGOS:
        where = ("nvidia-modelopt writes it; TensorRT-LLM reads it" if v.kv in TRTLLM_ONLY_ALGOS
                 else "no engine knows it")
        out.append(Finding(f"{src}:kv_cache_quant_algo", "kv-algo-unsupported",
                           f"kv_cache_quant_algo {v.kv!r} is not FP8 or NVFP4 ({where}). Use an FP8 or NVFP4 "
                           "KV-cache recipe (kv_fp8, kv_nvfp4) or none."))
    if v.mixed:
        if not v.layers:
            out.append(Finding(f"{src}:quantized_layers", "mixed-layers-empty",
                               "MIXED_PRECISION needs a non-empty quantized_layers mapping (vLLM raises without "
                               "one). Re-export the checkpoint."))
        for name, entry in v.layers.items():
            a = _upper(entry.get("quant_algo")) if isinstance(entry, dict) else None
            if a not in MIXED_LAYER_ALGOS:
                out.append(Finding(f"{src}:quantized_layers.{name}", "mixed-layer-algo-unsupported",
                                   f"per-layer quant_algo {a!r} is not one of {list(MIXED_LAYER_ALGOS)}, the formats "
                                   "vLLM's MIXED_PRECISION loader serves. Quantize this layer with one of them."))
    if hq is not None:
        q = hq.get("quantization")
        if not isinstance(q, dict):
            out.append(Finding(f"{HQ}:quantization", "required-key-missing",
                               "hf_quant_config.json has no \"quantization\" object. Re-export the checkpoint."))
        else:
            need = ["quant_algo", "kv_cache_quant_algo"]
            if v.algo in ("NVFP4", "W4A16_NVFP4"):
                need.append("group_size")
            if not v.mixed:
                need.append("exclude_modules")
            for k in need:
                if k not in q:
                    out.append(Finding(f"{HQ}:quantization.{k}", "required-key-missing",
                                       f"key {k!r} is missing; loaders require it even when null (vLLM: "
                                       f"\"{v.algo or 'NVFP4'} quantization requires the following fields\"). "
                                       f"Add \"{k}\": {json.dumps(q.get(k))} or re-export."))
            if v.mixed and "exclude_modules" not in q:
                pass  # ModelOpt writes none for MIXED_PRECISION
        cq = v.ck.config.get("quantization_config")
        if isinstance(cq, dict):
            out.extend(_config_agreement(v, q if isinstance(q, dict) else {}, cq))
    return out


def _config_agreement(v: View, q: dict[str, Any], cq: dict[str, Any]) -> list[Finding]:
    out = []

    def bad(key: str, ours, theirs, what: str):
        out.append(Finding(f"{CQ}.{key}", "config-mismatch",
                           f"config.json says {theirs!r} but hf_quant_config.json says {ours!r} ({what}). vLLM "
                           "reads config.json, TensorRT-LLM hf_quant_config.json: make them agree (re-export)."))

    if not str(cq.get("quant_method", "")).lower().startswith("modelopt"):
        bad("quant_method", "modelopt", cq.get("quant_method"), "quant_method must be 'modelopt'")
    c = _from_config_json(cq)
    if _upper(c["quant_algo"]) != _upper(q.get("quant_algo")):
        bad("quant_algo", q.get("quant_algo"), c["quant_algo"], "quant_algo")
    kv_raw = cq.get("kv_cache_scheme")
    kv_c = _upper(kv_raw) if isinstance(kv_raw, str) else c["kv_cache_quant_algo"]
    if kv_c != _upper(q.get("kv_cache_quant_algo")):
        bad("kv_cache_scheme", q.get("kv_cache_quant_algo"), kv_raw, "KV-cache algorithm")
    if sorted(map(str, c["exclude_modules"] or [])) != sorted(map(str, q.get("exclude_modules") or [])):
        bad("ignore", q.get("exclude_modules"), c["exclude_modules"], "ignore vs exclude_modules")
    if _upper(q.get("quant_algo")) in ("NVFP4", "W4A16_NVFP4"):
        gs_c = c.get("group_size")
        if gs_c is not None and q.get("group_size") is not None and int(gs_c) != int(q["group_size"]):
            bad("config_groups.group_size", q.get("group_size"), gs_c, "NVFP4 group size")
    if "quantized_layers" in cq and cq["quantized_layers"] != q.get("quantized_layers"):
        bad("quantized_layers", "<hf_quant_config.json quantized_layers>", "<config.json quantized_layers>",
            "per-layer formats differ")
    return out


# ----------------------------------------------------------------------------------------------- linear rules
def _value_findings(v: View, name: str, *, per_tensor: bool, expert_input: bool) -> list[Finding]:
    """NaN/Inf/zero/negative in one scale tensor (zero allowed in block scales)."""
    tag = v.tag(name)
    try:
        nonfinite, negative, zero = scan(v.ck.get(name), tag)
    except Exception as e:  # noqa: BLE001 - a byte range that does not match its header
        return [Finding(name, "unreadable", f"cannot read this tensor ({e}). Re-download or re-export.")]
    out = []
    n = math.prod(v.shape(name))
    if nonfinite:
        out.append(Finding(name, "expert-input-scale" if expert_input else "scale-nonfinite",
                           f"{nonfinite} of {n} value(s) are NaN/Inf: the layer computes NaN. Recalibrate (a NaN "
                           "in the model or the calibration data) and re-export."))
    bad_zero = zero if per_tensor else 0
    if negative or bad_zero:
        what = f"{negative} negative" + (f", {bad_zero} zero" if bad_zero else "")
        hint = (" (vllm#45320: a zero expert input scale zeroes or NaNs the MoE output; ModelOpt fills "
                "uncalibrated experts from their siblings)") if expert_input else ""
        out.append(Finding(name, "expert-input-scale" if expert_input else "scale-nonpositive",
                           f"{what} value(s) of {n}: scales must be > 0{'' if per_tensor else ' (block scales >= 0)'}"
                           f"{hint}. Calibrate every layer (enough data to reach every expert) and re-export."))
    return out


def _expect(v: View, name: str, tags: tuple[str, ...], shapes: list[tuple[int, ...]], why: str) -> list[Finding]:
    if v.tag(name) not in tags:
        return [Finding(name, "scale-dtype", f"dtype {v.tag(name)}, expected {'/'.join(tags)} ({why}). "
                        "Re-export with a ModelOpt-compatible exporter.")]
    if shapes and v.shape(name) not in shapes:
        return [Finding(name, "scale-shape", f"shape {list(v.shape(name))}, expected "
                        f"{' or '.join(str(list(s)) for s in shapes)} ({why}). Re-export the checkpoint.")]
    return []


def _scalar(v: View, name: str, why: str, *, expert_input: bool = False) -> list[Finding]:
    f = _expect(v, name, ("F32",), [(), (1,)], why)
    return f or _value_findings(v, name, per_tensor=True, expert_input=expert_input)


def _check_scales(v: View, lin: Linear, algo: str) -> list[Finding]:
    """Every scale tensor of ``algo`` present, with its dtype, shape and values; no stray input_scale."""
    m = lin.module
    out: list[Finding] = []
    o, i = lin.shape if len(lin.shape) == 2 else (None, None)
    if o is None:
        return [Finding(m + ".weight", "scale-shape", f"quantized weight has shape {list(lin.shape)}; a ModelOpt "
                        "linear weight is 2-D [out, in]. Re-export the checkpoint.")]
    need = (["weight_scale", "weight_scale_2"] if algo in ("NVFP4", "W4A16_NVFP4", "W4A8_NVFP4_FP8", "W4A8_AWQ",
                                                             "NVFP4_AWQ")
            else ["weight_scale"])
    static = _STATIC_INPUT.get(algo)
    if static == "required" or (static == "optional" and lin.expert):
        need.append("input_scale")
    for s in need:
        name = f"{m}.{s}"
        if not v.has(name):
            expert_input = s == "input_scale" and lin.expert
            out.append(Finding(name, "expert-input-scale" if expert_input else "scale-missing",
                               f"missing: a {algo} linear needs its {s} (the engine would run with an "
                               "uninitialized scale or refuse to load). Re-export the checkpoint."))
    if out:
        return out
    if static is None and v.has(f"{m}.input_scale"):
        out.append(Finding(f"{m}.input_scale", "scale-unexpected",
                           f"{algo} quantizes activations dynamically or not at all; a static input_scale "
                           "does not belong to it. Re-export, or declare NVFP4/FP8 if activations are static."))
    ws = f"{m}.weight_scale"
    if algo == "FP8":
        out += _scalar(v, ws, "FP8 per-tensor weight scale = amax/448")
    elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
        out += _expect(v, ws, ("F32",), [(o,)], "one FP8 scale per output channel") or \
            _value_findings(v, ws, per_tensor=False, expert_input=False)
    elif algo == "FP8_PB_WO":
        ob, ib = math.ceil(o / 128), math.ceil(i / 128)
        out += _expect(v, ws, ("F32",), [(ob, ib), (ob, 1, ib, 1)], "128x128 FP8 block scales") or \
            _value_findings(v, ws, per_tensor=False, expert_input=False)
    elif algo == "MXFP8":
        out += _expect(v, ws, ("U8", "F8_E8M0"), [(o, math.ceil(i / 32))], "E8M0 scale per 32 inputs") or \
            _value_findings(v, ws, per_tensor=False, expert_input=False)
    elif algo in ("MXFP4", "W4A8_MXFP4_FP8"):  # weight [out, in/2]: two E2M1 codes per byte
        out += _expect(v, ws, ("U8", "F8_E8M0"), [(o, 2 * i // 32)], "E8M0 scale per 32 inputs")
    elif algo in ("W4A16_AWQ", "W4A8_AWQ"):  # weight [out/2, in]: two INT4 output rows per byte
        gs = _group_size(v, m)
        if i % gs:
            out.append(Finding(m + ".weight", "scale-shape", f"{i} inputs are not a multiple of group_size {gs}; "
                               "INT4 engines need whole blocks. Leave this layer unquantized."))
        out += _expect(v, ws, ("F32",), [(2 * o, i // gs)], f"one INT4 scale per {gs} inputs of each output row") or \
            _value_findings(v, ws, per_tensor=False, expert_input=False)
        if algo == "W4A8_AWQ":
            out += _scalar(v, f"{m}.weight_scale_2", "W4A8_AWQ FP8 weight scale = amax/448")
    elif algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        out += _expect(v, ws, ("F32",), [(o,)], "one INT8 scale per output channel") or \
            _value_findings(v, ws, per_tensor=False, expert_input=False)
    else:  # NVFP4 family: weight is [out, in/2] nibbles
        gs = _group_size(v, m)
        n_in = 2 * i
        if n_in % gs:
            out.append(Finding(m + ".weight", "scale-shape", f"{n_in} inputs are not a multiple of group_size "
                               f"{gs}; NVFP4 engines need whole blocks. Leave this layer unquantized."))
        out += _expect(v, ws, ("F8_E4M3",), [(o, n_in // gs)], f"one E4M3 scale per {gs} inputs") or \
            _value_findings(v, ws, per_tensor=False, expert_input=False)
        out += _scalar(v, f"{m}.weight_scale_2", "NVFP4 global weight scale = amax/2688")
    if v.has(f"{m}.input_scale") and static is not None:
        out += _scalar(v, f"{m}.input_scale", "per-tensor input scale", expert_input=lin.expert)
    out += _check_pre_quant_scale(v, m, algo, i)
    return out


#: Formats whose linears may scale their input by a ``pre_quant_scale`` (SmoothQuant, AWQ, SVDQuant).
_PQS_ALGOS = ("W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "NVFP4_AWQ", "NVFP4_SVD")


def _check_pre_quant_scale(v: View, m: str, algo: str, i: int) -> list[Finding]:
    """A ``<linear>.pre_quant_scale``: only on smoothing formats, one positive finite factor per input feature."""
    name = f"{m}.pre_quant_scale"
    if not v.has(name):
        return []
    if algo not in _PQS_ALGOS:
        return [Finding(name, "scale-unexpected", f"{algo} linears take no pre_quant_scale (only "
                        f"{', '.join(_PQS_ALGOS)}); an engine would ignore it and run on unscaled inputs. Re-export.")]
    n_in = i if algo in ("W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL") else 2 * i  # NVFP4: [out, in/2] nibbles
    return (_expect(v, name, ("F32", "BF16", "F16"), [(n_in,)], "one smoothing factor per input feature")
            or _value_findings(v, name, per_tensor=True, expert_input=False))


def check_linears(v: View) -> list[Finding]:
    """Each linear's tensors against its declared format, exclusion and scale rules."""
    out: list[Finding] = []
    rewritten = _vllm_rewritten(v.exclude)
    for m, lin in sorted(v.linears.items()):
        algo = declared_algo(v, m)
        key = m + ".weight" if lin.tag is not None else m
        is_head = m == "lm_head" or m.endswith(".lm_head")
        if lin.family is None:
            if algo is None:
                continue
            if any(p in m for p in _VISION) and not v.mixed:
                continue
            if v.mixed:
                out.append(Finding(key, "format-mismatch", f"quantized_layers declares {algo} but the weight is "
                                   f"{lin.tag}: the engine expects packed weights and scales. Re-export."))
            else:
                out.append(Finding(key, "exclude-missing",
                                   f"unquantized ({lin.tag or 'tied to the embedding'}) but no exclude_modules "
                                   f"entry matches {m!r}: vLLM loads it as {algo} and fails or computes garbage. "
                                   f"Add {m!r} to exclude_modules (and to config.json's ignore)."))
            continue
        excluded = vllm_excluded(m, v.exclude) or vllm_excluded(m, rewritten)
        if algo is None or (excluded and not v.mixed):
            if excluded and is_head:
                out.append(Finding(key, "lm-head-quantized-excluded",
                                   "lm_head is quantized but exclude_modules matches it (vllm#45102): vLLM loads "
                                   "it unquantized and drops or chokes on its scales. Either leave lm_head "
                                   "unquantized or remove it from exclude_modules/ignore."))
            elif excluded:
                pat = next(p for p in v.exclude + rewritten if vllm_excluded(m, [p]))
                out.append(Finding(key, "exclude-matches-quantized",
                                   f"quantized ({lin.tag}) but exclude_modules entry {pat!r} matches it: vLLM "
                                   "loads it as unquantized. Narrow the exclude_modules entry."))
            elif v.mixed:
                out.append(Finding(key, "mixed-layer-missing",
                                   f"quantized ({lin.tag}) but not listed in quantized_layers: vLLM runs it "
                                   f"unquantized. Add {m!r} with its quant_algo to quantized_layers."))
            elif v.declared:
                out.append(Finding(key, "format-mismatch", f"quantized ({lin.tag}) but quant_algo is null. "
                                   "Declare the format in hf_quant_config.json or re-export."))
            continue
        fam = _FAMILY.get(algo)
        if fam is None:
            continue  # an algo reported by check_config
        if lin.family != fam:
            out.append(Finding(key, "format-mismatch",
                               f"weight is {lin.tag} {list(lin.shape)} but the declared format is {algo} "
                               f"({'U8 nibbles' if fam == 'nvfp4' else 'F8_E4M3'} expected). The config and the "
                               "tensors disagree: re-export."))
            continue
        out += _check_scales(v, lin, algo)
    return out


def _effective(v: View, lin: Linear) -> str:
    algo = declared_algo(v, lin.module)
    return "unquantized" if lin.family is None else (algo or f"{lin.tag} (undeclared)")


def check_fused(v: View) -> list[Finding]:
    """Siblings an engine fuses into one GEMM share a format, and for NVFP4 one global scale."""
    out: list[Finding] = []
    parents: dict[str, dict[str, Linear]] = {}
    for m, lin in v.linears.items():
        if "." in m:
            p, leaf = m.rsplit(".", 1)
            parents.setdefault(p, {})[leaf] = lin
    for p, kids in sorted(parents.items()):
        for group in _FUSED:
            members = [kids[g] for g in group if g in kids]
            if len(members) < 2:
                continue
            fmts = {lin.module: _effective(v, lin) for lin in members}
            first = members[0]
            if len(set(fmts.values())) > 1:
                for lin in members[1:]:
                    if fmts[lin.module] != fmts[first.module]:
                        out.append(Finding(lin.module + ".weight", "fused-format-mismatch",
                                           f"{fmts[lin.module]} while its fused sibling {first.module} is "
                                           f"{fmts[first.module]}: engines fuse {'/'.join(group)} into one GEMM "
                                           "(vLLM: \"Mixed quant_algo within fused layer\"). Quantize the "
                                           "siblings alike."))
                continue
            if first.family != "nvfp4":
                continue
            for s in ("weight_scale_2", "input_scale"):
                names = [f"{lin.module}.{s}" for lin in members]
                if not all(v.has(n) and v.tag(n) == "F32" for n in names):
                    continue
                arrs = [np.asarray(v.ck.get(n), np.float32).reshape(-1) for n in names]
                if not all(a.size == 1 and np.isfinite(a[0]) and a[0] > 0 for a in arrs):
                    continue  # reported by the value rules
                vals = [a.tobytes() for a in arrs]
                for n, val in zip(names[1:], vals[1:]):
                    if val != vals[0]:
                        out.append(Finding(n, "fused-scale-mismatch",
                                           f"differs from {names[0]}: an engine fuses {'/'.join(group)} and "
                                           f"keeps one {s} (vLLM takes the max without recomputing the block "
                                           "scales). Export with one global scale per fused group (ModelOpt's "
                                           "preprocess_linear_fusion) and recompute the block scales."))
    return out


# ----------------------------------------------------------------------------------------------- KV cache
def _kv_owners(v: View) -> list[str]:
    """Attention modules that own a KV cache: they have k_proj weights and are not in the KV-shared tail."""
    n = v.ck.text_config("num_hidden_layers")
    shared = v.ck.text_config("num_kv_shared_layers") or 0
    first_shared = (int(n) - int(shared)) if (n and shared) else None
    owners = []
    for m in v.linears:
        if not m.endswith(".k_proj"):
            continue
        attn = m[: -len(".k_proj")]
        if any(p in attn + "." for p in _ENCODERS):
            continue  # vision/audio encoders attend bidirectionally and keep no KV cache
        mm = _LAYER.search(attn + ".")
        if first_shared is not None and mm and int(mm.group(1)) >= first_shared:
            continue
        owners.append(attn)
    return sorted(owners)


def _sidecar_kv(v: View) -> set[str]:
    """Attention modules whose calibrated K/V amax jaxquant's sidecar records (not a *_cast export)."""
    p = v.ck.directory / "jaxquant_quant_state.json"
    try:
        amax = json.loads(p.read_text()).get("amax", {}) if p.is_file() else {}
    except (OSError, ValueError):
        return set()
    return {k.rsplit(".", 1)[0] for k in amax if k.endswith(("k_bmm_quantizer", "v_bmm_quantizer"))}


def check_kv(v: View) -> list[Finding]:
    """k_scale / v_scale present for every cache-owning attention iff kv_cache_quant_algo is set; values valid."""
    out: list[Finding] = []
    scales = sorted(n for n in v.ck.infos if n.endswith((".k_proj.k_scale", ".v_proj.v_scale")))
    if v.kv is None:
        if v.declared:
            for n in scales:
                out.append(Finding(n, "kv-scale-unexpected",
                                   "a KV-cache scale while kv_cache_quant_algo is null: engines ignore it (the "
                                   "cache stays unquantized) or mis-scale it. Set kv_cache_quant_algo to the KV "
                                   "format these scales were calibrated for, or drop them."))
        return out
    calibrated = bool(scales) or bool(_sidecar_kv(v))
    if calibrated:
        for attn in _kv_owners(v):
            for n in (f"{attn}.k_proj.k_scale", f"{attn}.v_proj.v_scale"):
                if not v.has(n):
                    out.append(Finding(n, "kv-scale-missing",
                                       f"kv_cache_quant_algo is {v.kv} and other layers have calibrated KV scales, "
                                       "but this cache-owning attention layer has none: the engine runs its "
                                       f"{v.kv} cache at scale 1.0. Export every layer's k_scale/v_scale."))
    for n in scales:
        out += _scalar(v, n, f"{v.kv} KV-cache scale = amax/448")
    for n in sorted(n for n in v.ck.infos if n.endswith((".k_proj.k_bias", ".v_proj.v_bias"))):  # affine KV
        scale = n[: -len("bias")] + "scale"
        shape = tuple(v.shape(n))
        if not v.has(scale):
            out.append(Finding(n, "kv-bias-unexpected", f"an affine KV bias without its {scale.rsplit('.', 1)[1]}: "
                               "the cache it centres is not quantized. Re-export the checkpoint."))
        elif len(shape) != 4 or shape[0] != 1 or shape[2] != 1 or v.ck.infos[n].dtype not in _FLOAT:
            out.append(Finding(n, "scale-shape", f"{v.ck.infos[n].dtype} {list(shape)}; an affine KV bias is a "
                               "float [1, kv heads, 1, head_dim] tensor (one value per head and channel). "
                               "Re-export the checkpoint."))
    return out


def check_exclude_entries(v: View) -> list[Finding]:
    """Every exclude_modules entry matches some module (an entry matching nothing is a stale/misspelt name)."""
    out = []
    for p in v.exclude:
        if isinstance(p, str) and (p in v.modules or (p.endswith("*") and "*" not in p[:-1] and "?" not in p
                                                      and "[" not in p and any(m.startswith(p[:-1])
                                                                               for m in v.modules))):
            continue  # the common ModelOpt entries: an exact module name or ``prefix*``
        if not isinstance(p, str) or not any(vllm_excluded(m, [p]) for m in v.modules):
            out.append(Finding(f"{HQ if v.ck.hf_quant is not None else CQ}:exclude_modules[{p!r}]",
                               "exclude-unmatched",
                               f"entry {p!r} matches no module of the checkpoint (exactly, as a substring or as a "
                               "wildcard): a misspelt or stale name, so the module it meant is not excluded. Fix "
                               "or remove it."))
    return out


def check_deep(v: View) -> list[Finding]:
    """(deep) NaN/Inf in FP8 weights and in every unquantized float tensor."""
    out = []
    for name, info in sorted(v.ck.infos.items()):
        if info.dtype not in _FLOAT + ("F8_E4M3", "F8_E5M2") or name.endswith(
                (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")):
            continue
        try:
            nonfinite, _, _ = scan(v.ck.get(name), info.dtype)
        except Exception as e:  # noqa: BLE001
            out.append(Finding(name, "unreadable", f"cannot read this tensor ({e}). Re-download or re-export."))
            continue
        if nonfinite:
            out.append(Finding(name, "weight-nonfinite", f"{nonfinite} NaN/Inf value(s): the model computes NaN. "
                               "Fix the source weights (jaxquant refuses NaN sources) and re-export."))
    return out
