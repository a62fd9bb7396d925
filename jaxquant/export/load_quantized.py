"""Load a ModelOpt-format FP8 / NVFP4 checkpoint (jaxquant's own exports, or NVIDIA's published
ones) into the Flax model, so JAX users can evaluate quantized checkpoints on TPU, GPU or CPU.

``load_quantized(dir)`` returns a ``LoadedModel`` like ``load_hf``:

* Each quantized linear becomes a ``QuantizedLinear`` that keeps the checkpoint's packed weight
  (``U8`` NVFP4 nibbles or ``F8_E4M3``) and its scales on the device and dequantizes inside the
  jitted forward, right before the matmul (``weights="packed"``, the default); or the weights are
  dequantized once while loading into ordinary ``Linear`` modules (``weights="dequantize"``).
  Stacked MoE experts are always dequantized on load, and so is a quantized token table (``nvfp4_fp8_mha``'s
  W4A16_NVFP4 ``embed_tokens``): the embedding holds the dequantized values, its weight quantizer off.
* Activations: a linear with an ``input_scale`` gets its ``input_quantizer`` configured with the
  checkpoint's format and ``amax = input_scale * 448`` (FP8) or ``* 2688`` (NVFP4), in fake-quant
  mode, so the forward emulates what a serving engine computes (``activations="off"`` skips it).
  ``k_scale`` / ``v_scale`` likewise configure FP8 ``k_bmm`` / ``v_bmm`` quantizers.
* ``<linear>.pre_quant_scale`` (SmoothQuant / AWQ) becomes the input quantizer's pre-quantization scale: the
  activation is multiplied by it before it is quantized (or, for W4A16, before the matmul).
* Formats are detected from the tensors themselves (``weight`` U8 + ``weight_scale_2`` = NVFP4,
  ``weight`` F8_E4M3 + ``weight_scale`` = FP8), so checkpoints whose ``hf_quant_config.json`` is
  missing still load; ``config.json["quantization_config"]`` is kept in ``hf_config``.

Everything is read with jaxquant's own safetensors reader (safetensors' numpy reader cannot return
F8 tensors, safetensors#682).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import formats
from jaxquant.check.rules import quantized_layer_entry
from jaxquant.errors import CheckpointError, UnsupportedError
from jaxquant.models.walk import iter_modules
from jaxquant.export.atomic import is_incomplete
from jaxquant.quantizer import TensorQuantizer
from jaxquant.quantizer.config import QuantizerConfig

FP8_CONFIG = formats.get("fp8").activation_config()  # KV caches: FP8 K/V fake quant
#: FP8 K/V around the exported per-head bias (``k_bias`` / ``v_bias`` of ``--kv_cache_qformat fp8_affine``)
FP8_AFFINE_CONFIG = QuantizerConfig.from_dict({"num_bits": (4, 3), "bias": {-2: None, -4: None, "type": "static"}})
_SCALE_RE = re.compile(r"\.(weight_scale|weight_scale_2|input_scale|k_scale|v_scale|k_bias|v_bias|pre_quant_scale)$")


class PackedWeight(nnx.Variable):
    """A quantized weight as stored in the checkpoint (uint8 NVFP4 nibbles or float8_e4m3fn)."""


class WeightScale(nnx.Variable):
    """A checkpoint scale tensor (``weight_scale`` / ``weight_scale_2``)."""


# ----------------------------------------------------------------------------------------------- dequantization
def _tensors(weight, weight_scale, weight_scale_2=None) -> dict:
    t = {"weight": weight, "weight_scale": weight_scale}
    if weight_scale_2 is not None:
        t["weight_scale_2"] = weight_scale_2
    return t


class QuantizedLinear(nnx.Module):
    """A ``Linear`` whose weight stays quantized in memory and is dequantized in the forward.

    Attributes mirror the checkpoint: ``weight`` (``PackedWeight``), ``weight_scale``,
    ``weight_scale_2`` (NVFP4), ``bias``; and the three quantizers of ``Linear``
    (``weight_quantizer`` stays disabled: the weight is already quantized).
    """

    modelopt_class = "nn.Linear"

    def __init__(self, fmt: str, weight, weight_scale, weight_scale_2=None, bias=None, *, in_features: int,
                 out_features: int, dtype=jnp.bfloat16, precision=None):
        formats.get(fmt)  # UnsupportedError for an unknown format
        self.fmt = fmt
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = jnp.dtype(dtype)
        self.weight = PackedWeight(jnp.asarray(weight))
        self.weight_scale = WeightScale(jnp.asarray(weight_scale))
        self.weight_scale_2 = WeightScale(jnp.asarray(weight_scale_2)) if weight_scale_2 is not None else None
        self.bias = nnx.Param(jnp.asarray(bias, self.dtype)) if bias is not None else None
        self.precision = precision
        self.input_quantizer = TensorQuantizer()
        self.weight_quantizer = TensorQuantizer()
        self.output_quantizer = TensorQuantizer()

    def dequantized_weight(self) -> jax.Array:
        s2 = self.weight_scale_2[...] if self.weight_scale_2 is not None else None
        return formats.get(self.fmt).dequantize(_tensors(self.weight[...], self.weight_scale[...], s2), self.dtype)

    def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None, preferred_element_type=None):
        x = self.input_quantizer(x, token_mask=token_mask)
        w = self.dequantized_weight()
        if x.dtype != w.dtype:
            x = x.astype(w.dtype)
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=self.precision,
                                preferred_element_type=preferred_element_type)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return self.output_quantizer(y, token_mask=token_mask)


# ----------------------------------------------------------------------------------------------- detection
@dataclasses.dataclass(frozen=True)
class QuantizedTensorInfo:
    """One quantized linear found in a checkpoint (HF module name ``module``)."""

    module: str
    fmt: str  # a jaxquant.formats name: "fp8" (per tensor or per channel) | "nvfp4" | "int8_wo" | "int4_awq" | ...
    has_input_scale: bool

    @property
    def format(self):
        """The ``QuantFormat`` that dequantizes this layer."""
        return formats.get(self.fmt)


def detect_quantized(files) -> dict[str, QuantizedTensorInfo]:
    """``{HF module name: info}`` for every quantized linear weight in ``files`` (CheckpointFiles)."""
    out = {}
    for k in files.keys():
        if not k.endswith(".weight"):
            continue
        mod = k[: -len(".weight")]
        tag = files.tensor_info(k).dtype
        if (tag == "U8" and f"{mod}.weight_scale_2" in files and f"{mod}.weight_scale" in files
                and files.tensor_info(f"{mod}.weight_scale").dtype == "F32"):  # INT4 row pairs + FP8 step: W4A8_AWQ
            if f"{mod}.pre_quant_scale" in files:
                raise UnsupportedError(f"{files.directory}: {mod} is W4A8_AWQ with an AWQ pre_quant_scale; "
                                       "jaxquant's loader does not apply pre_quant_scale yet.")
            out[mod] = QuantizedTensorInfo(mod, "w4a8_awq", f"{mod}.input_scale" in files)
        elif tag == "U8" and f"{mod}.weight_scale_2" in files and f"{mod}.weight_scale" in files:
            out[mod] = QuantizedTensorInfo(mod, "nvfp4", f"{mod}.input_scale" in files)
        elif (tag == "U8" and f"{mod}.weight_scale" in files
              and files.tensor_info(f"{mod}.weight_scale").dtype == "U8"):  # E2M1 pairs + E8M0 exponents: MXFP4
            has_in = f"{mod}.input_scale" in files  # static FP8 activations: W4A8_MXFP4_FP8
            out[mod] = QuantizedTensorInfo(mod, "w4a8_mxfp4_fp8" if has_in else "mxfp4", has_in)
        elif (tag == "F8_E4M3" and f"{mod}.weight_scale" in files
              and files.tensor_info(f"{mod}.weight_scale").dtype == "U8"):  # E8M0 block exponents: MXFP8
            out[mod] = QuantizedTensorInfo(mod, "mxfp8", f"{mod}.input_scale" in files)
        elif (tag == "F8_E4M3" and f"{mod}.weight_scale" in files
              and len(files.tensor_info(f"{mod}.weight_scale").shape) == 4):  # [Mb, 1, Nb, 1]: 2-D blocks
            out[mod] = QuantizedTensorInfo(mod, "fp8_pb_wo", f"{mod}.input_scale" in files)
        elif tag == "F8_E4M3" and f"{mod}.weight_scale" in files:
            if files.tensor_info(f"{mod}.weight_scale").dtype != "F32":
                raise UnsupportedError(f"{mod}: FP8 weight with a {files.tensor_info(f'{mod}.weight_scale').dtype} "
                                       "scale (block-scaled FP8) is not supported by jaxquant's loader.")
            out[mod] = QuantizedTensorInfo(mod, "fp8", f"{mod}.input_scale" in files)
        elif (tag == "U8" and f"{mod}.weight_scale" in files
              and files.tensor_info(f"{mod}.weight_scale").dtype == "F32"):  # INT4 row pairs + block scales
            out[mod] = QuantizedTensorInfo(mod, "int4_awq", f"{mod}.input_scale" in files)
        elif tag == "I8" and f"{mod}.weight_scale" in files and files.tensor_info(f"{mod}.weight_scale").dtype == "F32":
            has_in = f"{mod}.input_scale" in files  # static INT8 activations: W8A8 (int8_sq)
            out[mod] = QuantizedTensorInfo(mod, "int8_sq" if has_in else "int8_wo", has_in)
        elif tag in ("U8", "I8", "F8_E4M3", "F8_E5M2") and not mod.endswith(("embed_tokens",)):
            raise UnsupportedError(f"{files.directory}: {k} is {tag} without the scales of a ModelOpt FP8/NVFP4 "
                                   "layer; this quantization format is not supported by jaxquant's loader.")
    return out


def fp8_dequant_scale(weight_scale, amax=None) -> np.ndarray:
    """The factor FP8 codes are multiplied by on load.

    Without a known weight amax: the checkpoint's ``weight_scale`` (``amax / 448``), as engines use it.
    With the exact amax (from the export's sidecar, checked against ``weight_scale``): fake quant's
    ``1 / (448 / amax)`` (which can differ from ``amax / 448`` in the last bit), so the loaded model
    reproduces the calibrated fake-quant model bit for bit.
    """
    s = np.asarray(weight_scale, np.float32)
    if amax is None or s.ndim != 0:
        return s
    a = np.float32(amax)
    if np.float32(a / np.float32(448.0)) != s:
        return s
    safe = np.float32(1.0) if a <= np.float32(2.0**-24) else a
    scale = np.float32(np.float32(np.float32(1.0) / safe) * np.float32(448.0))  # torch: 448 / t = t.reciprocal() * 448
    return np.float32(np.float32(1.0) / scale)


def _dequant(files, info: QuantizedTensorInfo, fp8_scale=None) -> np.ndarray:
    """The float32 weight of one quantized linear, dequantized by its format (jitted, on the device)."""
    mod = info.module
    scale = fp8_scale if fp8_scale is not None else files.get(mod + ".weight_scale")
    s2 = files.get(mod + ".weight_scale_2") if f"{mod}.weight_scale_2" in files else None
    return np.asarray(info.format.dequantize(_tensors(files.get(mod + ".weight"), scale, s2), jnp.float32))


class DequantizingSource:
    """``TensorSource`` serving quantized weights as float32 (dequantized) and the rest unchanged.

    With ``placeholders`` (the names of weights that will be replaced by ``QuantizedLinear``) those
    weights are served as zeros instead of being dequantized.
    """

    def __init__(self, base, files, quantized: dict[str, QuantizedTensorInfo], placeholders=frozenset(),
                 fp8_scales: dict | None = None):
        self.base, self.files, self.quantized, self.placeholders = base, files, quantized, placeholders
        self.fp8_scales = fp8_scales or {}

    def _q(self, name):
        if name.endswith(".weight"):
            return self.quantized.get(name[: -len(".weight")])
        return None

    def has(self, name):
        return self.base.has(name)

    def shape(self, name):
        q = self._q(name)
        s = tuple(self.base.shape(name))
        if q is not None:
            return q.format.weight_shape(s)  # e.g. two NVFP4 elements per byte
        return s

    def dtype(self, name):
        return "F32" if self._q(name) is not None else self.base.dtype(name)

    def get(self, name):
        q = self._q(name)
        if q is None:
            return self.base.get(name)
        if name in self.placeholders:
            return np.broadcast_to(np.zeros((), np.float32), self.shape(name))
        # q.module: the name inside the files
        return _dequant(self.files, q, self.fp8_scales.get(name[: -len(".weight")]))

    def where(self, name):
        return self.base.where(name)


# ----------------------------------------------------------------------------------------------- loading
def _read_state(d: Path) -> dict:
    """Exact amax from the export's sidecar (``jaxquant_quant_state.json``), if any."""
    import json

    from jaxquant.export.hf import STATE_FILE

    p = d / STATE_FILE
    if not p.is_file():
        return {}
    try:
        return {str(k): float(v) for k, v in (json.loads(p.read_text()).get("amax") or {}).items()}
    except (ValueError, AttributeError, TypeError):
        return {}


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a ModelOpt-format quantized checkpoint."""
    import json

    d = Path(path)
    if (d / "hf_quant_config.json").is_file():
        return True
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            qcfg = json.loads(cfg.read_text()).get("quantization_config") or {}
        except (ValueError, OSError):
            return False
        return qcfg.get("quant_method") == "modelopt"
    return False


def _navigate(model, nnx_path: str):
    node = model
    parts = nnx_path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    return node, parts[-1]


def _module_at(model, nnx_path: str):
    """The module owning the parameter at ``nnx_path`` (``...q_proj.weight`` -> the ``q_proj`` module), or None."""
    try:
        parent, attr = _navigate(model, nnx_path[: -len(".weight")] if nnx_path.endswith(".weight") else nnx_path)
        return parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def amax_from_scale(scale, divisor: float) -> np.float32:
    """An amax whose exported scale is exactly ``scale`` (``float32(amax / divisor) == scale``).

    ``scale * divisor`` rounded to float32 can miss by one ulp; the neighbours are tried so that
    NVFP4 fake quant (which only uses ``amax / 2688``) reproduces the engine's global scale
    exactly, and FP8 gets the amax closest to ``scale * 448``.
    """
    s = np.float32(scale)
    d = np.float32(divisor)
    exact = float(s) * float(divisor)
    c = np.float32(s * d)
    cands = [c]
    up = down = c
    for _ in range(3):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        cands += [up, down]
    cands.sort(key=lambda x: abs(float(x) - exact))
    for x in cands:
        if np.float32(x / d) == s:
            return np.float32(x)
    return c


def _exact_amax(known: dict, name: str, scale, divisor: float) -> np.float32:
    """The sidecar's exact amax for ``name`` when it agrees with the checkpoint's scale, else one
    reconstructed from the scale."""
    v = known.get(name)
    if v is not None and np.float32(np.float32(v) / np.float32(divisor)) == np.float32(scale):
        return np.float32(v)
    return amax_from_scale(scale, divisor)


def _fake_quant_input(q: TensorQuantizer, cfg: QuantizerConfig, amax: float, tensor_shape=None):
    q.configure(cfg, tensor_shape=tensor_shape)
    q.amax.value = jnp.asarray(amax, jnp.float32).reshape(q.amax.value.shape)
    q.set_mode("fake_quant")


def _validate_for_loading(d: Path) -> None:
    """Refuse a checkpoint whose numbers are wrong (``INTEGRITY_RULES``); warn about the rest."""
    import logging

    from jaxquant.check import INTEGRITY_RULES, validate_checkpoint

    report = validate_checkpoint(d)
    blocking = [f for f in report.findings if f.rule in INTEGRITY_RULES]
    if blocking:
        shown = "; ".join(f.format() for f in blocking[:5])
        more = f"; and {len(blocking) - 5} more" if len(blocking) > 5 else ""
        raise CheckpointError(f"{d} is not a loadable quantized checkpoint: {shown}{more}. Run `jaxquant check {d}` "
                              "for every finding; re-export it from the original model.")
    for f in report.findings:
        if f.rule != "quant-config-missing":  # detected from the tensors themselves (module docstring)
            logging.getLogger(__name__).warning("%s (a serving engine may reject this checkpoint)", f.format())


def load_quantized(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    weights: Literal["packed", "dequantize"] = "packed",
    activations: Literal["fake_quant", "off"] = "fake_quant",
    validate: bool = True,
):
    """Load a ModelOpt FP8 / NVFP4 / mixed checkpoint directory as a ``LoadedModel``.

    The directory is first checked with ``validate_checkpoint`` (headers and scale tensors, seconds):
    findings of ``INTEGRITY_RULES`` (NaN/zero/negative or missing scales, wrong dtypes or shapes,
    missing KV scales) refuse the load with the finding; the other findings (what serving engines
    would reject: configs, exclusions, fused-sibling scales) are logged as warnings.

    Args:
      path: checkpoint directory (``config.json`` + safetensors, as ``export_hf`` writes it).
      dtype: compute / unquantized-parameter dtype.
      weights: ``"packed"`` keeps quantized weights packed and dequantizes in the forward;
        ``"dequantize"`` dequantizes once on load into ordinary ``Linear`` modules.
      activations: ``"fake_quant"`` emulates the checkpoint's activation and KV quantization from
        ``input_scale`` / ``k_scale`` / ``v_scale``; ``"off"`` runs activations unquantized.
      validate: run the checkpoint validator first (default); False skips it.

    Raises:
      CheckpointError: an interrupted export, missing files, or tensors that do not match the config.
      UnsupportedError: a quantization format other than ModelOpt FP8 / NVFP4.
    """
    from jaxquant.converters.hf import (
        LoadedModel,
        SafetensorsSource,
        collect_extra_tensors,
        materialize,
        read_hf_config,
        resolve_dtype,
    )
    from jaxquant.converters.names import NameMap
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.models.config import ModelConfig, import_object

    d = Path(path)
    if is_incomplete(d):
        raise CheckpointError(f"{d} is an interrupted jaxquant export (incomplete); export again.")
    if weights not in ("packed", "dequantize"):
        raise ValueError(f"weights={weights!r}: use 'packed' or 'dequantize'")
    if validate:
        _validate_for_loading(d)
    dtype = resolve_dtype(dtype)
    hf_config = read_hf_config(d)
    plain = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config = ModelConfig.from_hf_config(plain, source=str(d / "config.json"))
    nm = NameMap.for_config(config)
    files = CheckpointFiles.open(d)
    base = SafetensorsSource(files, nm)
    # keyed by canonical (transformers v5) module name; info.module is the name inside the files
    quantized = {nm.canonical(k + ".weight")[: -len(".weight")]: v for k, v in detect_quantized(files).items()}
    quantized = _apply_declared_w4a8(quantized, d, hf_config)
    adapter = import_object(config.spec.tensor_adapter) if config.spec.tensor_adapter else None

    known = {nm.canonical(k): v for k, v in _read_state(d).items()}  # canonical quantizer names
    # which quantized weights become QuantizedLinear (dense linears whose NNX path exists as a Linear); the rest
    # (a quantized token table: ModelOpt's nvfp4_fp8_mha quantizes embed_tokens) are dequantized once, on load
    from jaxquant.converters.names import param_paths
    from jaxquant.models.decoder import abstract_model
    from jaxquant.models.layers import Linear

    shape_model = abstract_model(config, dtype=dtype)  # also what materialize fills, and the owned parameter paths
    owned = param_paths(shape_model)
    placeholders = set()
    if weights == "packed":
        for mod in quantized:
            p = nm.nnx_path(mod + ".weight")
            if p is not None and ".experts." not in mod and isinstance(_module_at(shape_model, p), Linear):
                placeholders.add(mod + ".weight")
    fp8_scales = {mod: fp8_dequant_scale(files.get(i.module + ".weight_scale"), known.get(mod + ".weight_quantizer"))
                  for mod, i in quantized.items() if i.format.sidecar_weight_amax}
    source = DequantizingSource(base, files, quantized, frozenset(placeholders), fp8_scales)
    if adapter is not None:
        source = adapter(config, source)
    model = materialize(config, source, dtype=dtype, name_map=nm, abstract=shape_model)

    for mod, info in quantized.items():
        p = nm.nnx_path(mod + ".weight")
        if p is None:
            continue
        mod_path = p[: -len(".weight")]
        try:
            parent, attr = _navigate(model, mod_path)
            lin = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
        except (AttributeError, IndexError, KeyError, TypeError):
            continue  # per-expert tensors: loaded (dequantized) through the stacked experts
        if not isinstance(lin, Linear):
            continue
        if mod + ".weight" in placeholders:
            bias = lin.bias[...] if lin.bias is not None else None
            new = QuantizedLinear(
                info.fmt, files.get(info.module + ".weight"),
                fp8_scales.get(mod, files.get(info.module + ".weight_scale")),
                files.get(info.module + ".weight_scale_2") if f"{info.module}.weight_scale_2" in files else None, bias,
                in_features=lin.in_features, out_features=lin.out_features, dtype=dtype, precision=lin.precision,
            )
            setattr(parent, attr, new)
            lin = new
        if f"{info.module}.pre_quant_scale" in files:  # SmoothQuant / AWQ: the input is scaled before the GEMM
            pqs = np.asarray(files.get(info.module + ".pre_quant_scale"), np.float32).reshape(-1)
            if pqs.shape != (lin.in_features,):
                raise CheckpointError(f"{d}: {info.module}.pre_quant_scale has shape {list(pqs.shape)}, expected "
                                      f"[{lin.in_features}] (one factor per input feature).")
            lin.input_quantizer.set_pre_quant_scale(pqs)
        if activations == "fake_quant" and info.has_input_scale:
            s = np.asarray(files.get(info.module + ".input_scale")).reshape(())
            qname = mod + ".input_quantizer"
            _fake_quant_input(lin.input_quantizer, info.format.activation_config(),
                              _exact_amax(known, qname, s, info.format.input_divisor))
        elif activations == "fake_quant" and info.format.dynamic_activation_config() is not None:
            lin.input_quantizer.configure(info.format.dynamic_activation_config())  # quantized at run time
            lin.input_quantizer.set_mode("fake_quant")
    _configure_experts_inputs(model, nm, base, quantized, activations)
    if activations == "fake_quant":
        _configure_kv(model, nm, base, kv_cache_algo(d, hf_config), known)
    consumes = getattr(source, "consumes", None)

    def _consumes(name: str) -> bool:
        return bool(_SCALE_RE.search(name)) or (consumes is not None and consumes(name))

    extra = collect_extra_tensors(files, nm, config, consumes=_consumes, owned=owned)
    return LoadedModel(model, config, extra, hf_config, d, nm)


def _apply_declared_w4a8(quantized: dict, d: Path, hf_config: dict) -> dict:
    """NVFP4 tensors of a layer declared W4A8_NVFP4_FP8 (globally or in ``quantized_layers``) belong to that
    format: the same tensors as NVFP4, but an FP8 ``input_scale`` and ``weight_scale_2 = amax / 448``."""
    import json

    q = {}
    p = d / "hf_quant_config.json"
    if p.is_file():
        try:
            q = json.loads(p.read_text()).get("quantization") or {}
        except ValueError:
            q = {}
    q = q or hf_config.get("quantization_config") or {}
    layers = q.get("quantized_layers") or {}

    def algo(mod: str) -> str | None:
        entry = quantized_layer_entry(layers, mod)
        return (entry or {}).get("quant_algo") if layers else q.get("quant_algo")

    return {k: (dataclasses.replace(v, fmt="w4a8_nvfp4_fp8") if v.fmt == "nvfp4" and algo(v.module) == "W4A8_NVFP4_FP8"
                else v) for k, v in quantized.items()}


def kv_cache_algo(d: Path, hf_config: dict) -> str | None:
    """``kv_cache_quant_algo`` of a checkpoint (hf_quant_config.json, else quantization_config)."""
    import json

    p = d / "hf_quant_config.json"
    if p.is_file():
        try:
            return (json.loads(p.read_text()).get("quantization") or {}).get("kv_cache_quant_algo")
        except ValueError:
            pass
    scheme = (hf_config.get("quantization_config") or {}).get("kv_cache_scheme")
    if isinstance(scheme, dict):
        return "FP8" if scheme.get("num_bits") == 8 and scheme.get("type") == "float" else None
    return scheme


def _configure_kv(model, nm, files, algo: str | None, known: dict) -> None:  # files: TensorSource
    """FP8 K/V fake quant with ``amax = k_scale * 448``; an FP8 KV cache without scales (``*_cast``
    exports) uses the engines' default scale 1.0, i.e. amax 448."""
    from jaxquant.converters.names import dotted
    from jaxquant.models.layers import Attention

    for path, node in iter_modules(model):
        if not isinstance(node, Attention):
            continue
        hf = nm.hf_name(dotted(path))
        for proj, key, role in (("k_proj", "k_scale", "k_bmm_quantizer"), ("v_proj", "v_scale", "v_bmm_quantizer")):
            name = f"{hf}.{proj}.{key}"
            bias = f"{hf}.{proj}.{key[0]}_bias"
            if files.has(name) and files.has(bias) and algo == "FP8":  # fp8_affine: fp8(x - bias) + bias
                s = np.asarray(files.get(name)).reshape(())
                q = getattr(node, role)
                b = np.asarray(files.get(bias), np.float32)  # ModelOpt's [1, heads, 1, head_dim]
                _fake_quant_input(q, FP8_AFFINE_CONFIG, _exact_amax(known, f"{hf}.{role}", s, 448.0),
                                  tensor_shape=(1, 1, b.shape[1], b.shape[3]))
                q.bias.value = jnp.asarray(b.transpose(0, 2, 1, 3))
            elif files.has(name):
                s = np.asarray(files.get(name)).reshape(())
                _fake_quant_input(getattr(node, role), FP8_CONFIG, _exact_amax(known, f"{hf}.{role}", s, 448.0))
            elif algo == "FP8":
                _fake_quant_input(getattr(node, role), FP8_CONFIG, 448.0)


def _configure_experts_inputs(model, nm, files, quantized, activations) -> None:  # files: TensorSource
    """Stacked experts: per-expert input amax from each expert's input_scale (fake quant)."""
    if activations != "fake_quant":
        return
    try:
        from jaxquant.models.moe import MoeExperts
    except ImportError:  # pragma: no cover
        return
    from jaxquant.converters.names import dotted

    for path, node in iter_modules(model):
        if not isinstance(node, MoeExperts):
            continue
        hf = nm.hf_name(dotted(path))
        for idx, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
            name = node.expert_names[idx]
            infos = [quantized.get(f"{hf}.{e}.{name}") for e in range(node.num_experts)]
            if not all(i is not None and i.has_input_scale for i in infos):
                continue
            fmts = {i.fmt for i in infos}
            if len(fmts) != 1:
                continue
            fmt = fmts.pop()
            mult = formats.get(fmt).input_divisor
            amax = np.array([amax_from_scale(np.asarray(files.get(f"{hf}.{e}.{name}.input_scale")).reshape(()), mult)
                             for e in range(node.num_experts)], np.float32)
            q = getattr(node, f"{proj}_input_quantizer")
            q.configure(formats.get(fmt).activation_config(), tensor_shape=node.quantizer_tensor_shape(f"{proj}_input_quantizer"))
            q.amax.value = jnp.asarray(amax).reshape(q.amax.value.shape)
            q.set_mode("fake_quant")
