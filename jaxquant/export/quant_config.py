"""The JSON side of a ModelOpt unified checkpoint: ``hf_quant_config.json`` and
``config.json["quantization_config"]``.

Pure functions, no model: the caller lists every linear layer that carries quantizers (HF module
name -> ModelOpt format string or ``None`` for "left unquantized") and the KV-cache algorithm; this
module produces exactly the dicts ModelOpt 0.47 writes (``get_quant_config`` +
``process_layer_quant_config`` + ``convert_hf_quant_config_format``, spec modelopt.md §5.3), except
``producer``, which names jaxquant. Tests compare them with ModelOpt's own functions.

Format strings are ModelOpt's (``modelopt.torch.export.model_config.QUANTIZATION_*``):
``"fp8"``, ``"fp8_pc_pt"``, ``"nvfp4"``, ``"nvfp4_static"``, ``"w4a16_nvfp4"``, each a
``jaxquant.formats`` object that knows its ``quant_algo`` and ``config_groups`` entry. The mapping
from a layer's (weight, input) ``QuantizerConfig`` pair to one of them is :func:`modelopt_format`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from jaxquant import formats
from jaxquant._version import __version__
from jaxquant.errors import UnsupportedError  # noqa: F401  (raised through formats.for_quantizers; callers catch qc.UnsupportedError)
from jaxquant.quantizer.config import QuantizerConfig

PRODUCER = {"name": "jaxquant", "version": __version__}

#: ModelOpt format strings jaxquant exports (the ``jaxquant.formats`` registry).
EXPORTABLE_FORMATS = tuple(formats.FORMATS)


def _enabled(cfg: QuantizerConfig | None) -> bool:
    return cfg is not None and cfg.enable


def modelopt_format(weight: QuantizerConfig | None, input: QuantizerConfig | None) -> str | None:
    """ModelOpt's per-layer format string for a linear with these weight / input quantizer configs.

    Mirrors ``get_quantization_format``: the weight quantizer decides; a layer whose weight
    quantizer is disabled counts as unquantized (``None``) even if its input quantizer is enabled.
    Each registered format says which configs it takes (``QuantFormat.match``).

    Raises:
      UnsupportedError: for combinations ModelOpt would export in a format jaxquant does not
        write (e.g. NVFP4 weights with FP8 activations = ``w4a8_nvfp4_fp8``).
    """
    f = formats.for_quantizers(weight, input)
    return None if f is None else f.name


def kv_cache_algo(config: QuantizerConfig | None) -> str | None:
    """``kv_cache_quant_algo`` for a K/V bmm quantizer config (``None`` when disabled).

    ``*_cast`` variants (constant amax) report the same algo; they only write no scales.
    """
    if not _enabled(config):
        return None
    if config.num_bits == (4, 3):
        return "FP8"
    if config.num_bits == 8:
        return "INT8"
    if config.num_bits == (2, 1):
        return "NVFP4_AFFINE" if config.bias else "NVFP4"
    return None


def layer_config_dict(layers: Mapping[str, tuple[str | None, int]]) -> dict[str, Any]:
    """ModelOpt's flat per-layer dict: ``{name.quantization: fmt, name.awq_block_size: bs}``.

    Args:
      layers: HF module name -> (ModelOpt format or None, weight block size; 0 when unblocked).
    """
    out: dict[str, Any] = {}
    for name, (fmt, block) in layers.items():
        out[name + ".quantization"] = fmt
        out[name + ".awq_block_size"] = block
    return out


def _layer_entry(fmt: str, block: int) -> dict[str, Any]:
    if fmt not in formats.FORMATS:
        return {"quant_algo": fmt}
    return formats.get(fmt).hf_layer_entry(block)


def _prefix_wildcards(name: str) -> set[str]:
    """Every ``prefix*`` of ``name`` (all cut points), plus the name itself."""
    return {name} | {name[:i] + "*" for i in range(len(name) + 1)}


def _dot_candidates(name: str) -> Iterable[list[str]]:
    """Candidate patterns for an unquantized module, broadest first: at each '.', ``prefix*``
    and then the pair ``{prefix, prefix.*}``; finally the exact name."""
    for i, ch in enumerate(name):
        if ch == ".":
            yield [name[:i] + "*"]
            yield [name[:i], name[:i] + ".*"]
    yield [name]


def summarize_exclude_modules(unquantized: Iterable[str], quantized: Iterable[str]) -> set[str]:
    """Compress the unquantized module names into prefix wildcards that match no quantized module.

    Same result as ModelOpt's ``_prefix_wildcard_summarize_exclude_modules``: per unquantized name
    (in order), the broadest dot-boundary candidate that no quantized name's prefix set contains;
    a candidate already fully in the summary ends the search with nothing added; a
    ``{prefix, prefix.*}`` pair is emitted as ``prefix.*`` only.
    """
    forbidden: set[str] = set()
    for q in quantized:
        forbidden |= _prefix_wildcards(q)
    summary: set[str] = set()
    for name in unquantized:
        chosen: list[str] = []
        for cand in _dot_candidates(name):
            if any(c in forbidden for c in cand):
                continue
            if all(c in summary for c in cand):
                chosen = []
                break
            chosen = cand
            break
        if len(chosen) == 2:
            short, long = sorted(chosen, key=len)
            summary.update([long] if long == short + ".*" else chosen)
        else:
            summary.update(chosen)
    return summary


def process_layer_quant_config(layer_config: Mapping[str, Any]) -> dict[str, Any]:
    """``quantization`` block from the flat per-layer dict (ModelOpt ``process_layer_quant_config``).

    One distinct layer config -> its fields at top level plus ``exclude_modules`` (sorted wildcard
    summary); several -> ``quant_algo: MIXED_PRECISION`` with ``quantized_layers``.
    """
    result: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": None, "quantized_layers": {}}
    distinct: set[str] = set()
    last: dict[str, Any] | None = None
    excluded: list[str] = []
    for key, fmt in layer_config.items():
        if "awq_block_size" in key:
            continue
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        entry = {"quant_algo": None} if fmt is None else _layer_entry(fmt, layer_config.get(prefix + ".awq_block_size", 0))
        if entry["quant_algo"] is None:
            excluded.append(prefix)
            continue
        distinct.add(str(entry))
        last = entry
        result["quantized_layers"][prefix] = entry
    if len(distinct) > 1:
        result["quant_algo"] = "MIXED_PRECISION"
    elif len(distinct) == 1 and last is not None:
        result.update(last)
        result["exclude_modules"] = sorted(summarize_exclude_modules(excluded, result["quantized_layers"].keys()))
        result.pop("quantized_layers")
    return result


def build_hf_quant_config(
    layers: Mapping[str, tuple[str | None, int]],
    kv_cache_quant_algo: str | None,
    producer: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole ``hf_quant_config.json`` dict (ModelOpt ``get_quant_config``).

    Args:
      layers: every linear that carries quantizers, in model order (HF module name -> (ModelOpt
        format or None, weight block size)). Unquantized linears (``lm_head``, excluded layers)
        and MoE routers belong here with ``None`` so they land in ``exclude_modules``.
      kv_cache_quant_algo: "FP8" / "NVFP4" / ... or None.
    """
    quantization: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": None}
    quantization.update(process_layer_quant_config(layer_config_dict(layers)))
    if kv_cache_quant_algo is not None:
        quantization["kv_cache_quant_algo"] = kv_cache_quant_algo
    return {"producer": dict(producer or PRODUCER), "quantization": quantization}


def is_quantized_export(hf_quant_config: Mapping[str, Any]) -> bool:
    """ModelOpt writes hf_quant_config.json / quantization_config only when this is true."""
    q = hf_quant_config.get("quantization", {})
    return q.get("quant_algo") is not None or q.get("kv_cache_quant_algo") is not None


def _group(algo: str, group_size: int | None) -> dict[str, Any]:
    """compressed-tensors ``config_groups`` entry for one algo; ``group_size`` already resolved."""
    f = formats.by_quant_algo(algo)
    return f.config_group(group_size) if f is not None else {"quant_algo": algo}


def convert_hf_quant_config_format(hf_quant_config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json["quantization_config"]`` (ModelOpt ``convert_hf_quant_config_format``):
    the compressed-tensors-style mirror, with ``quant_method: "modelopt"``."""
    details = hf_quant_config.get("quantization", {})
    algo = details.get("quant_algo")
    out: dict[str, Any] = {}
    uniform = formats.by_quant_algo(algo) if algo else None
    if uniform is not None and uniform.config_groups_when_uniform:
        group = _group(algo, details.get("group_size", 16))
        group["targets"] = ["Linear"]
        out["config_groups"] = {"group_0": group}
    elif algo == "MIXED_PRECISION":
        layers = details.get("quantized_layers", {})
        by_cfg: dict[tuple, list[str]] = {}
        for name, cfg in layers.items():
            by_cfg.setdefault(tuple(sorted(cfg.items())), []).append(name)
        groups = {}
        for i, (key, names) in enumerate(by_cfg.items()):
            cfg = dict(key)
            g = _group(cfg.get("quant_algo", ""), cfg.get("group_size") or 16)
            g["targets"] = sorted(names)
            groups[f"group_{i}"] = g
        out["config_groups"] = groups
        out["quantized_layers"] = layers
    excl = details.get("exclude_modules")
    out["ignore"] = excl if excl is not None else []
    if algo:
        out["quant_algo"] = algo
    kv = details.get("kv_cache_quant_algo")
    if kv:
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv == "FP8" else kv
    if hf_quant_config.get("producer"):
        out["producer"] = hf_quant_config["producer"]
    out["quant_method"] = "modelopt"
    return out
