"""The tensors of an export, planned lazily: ``plan_entries(model)`` lists every tensor the checkpoint will
hold (name, shape, dtype, and a function that produces it) without computing any of them.

Quantized linears are produced by their format object (``jaxquant.formats``: the jitted numerics of
``jaxquant.numerics``, run where the weight lives), once per layer for all its tensors. Everything else
keeps its HF name and the source checkpoint's dtype; tensors the text model does not own (vision tower,
projector, ...) are copied byte for byte from the source files.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxquant import formats
from jaxquant.errors import CheckpointError
from jaxquant.export.checks import check_calibrated, kv_algo, unwrap
from jaxquant.export.linears import (
    ExportLinear,
    config_of,
    hf_order_key,
    name_map_of,
    natural_key,
    unify,
    variable_value,
    walk,
)
from jaxquant.export.prequant import resmooth
from jaxquant.export.shards import Entry
from jaxquant.formats.base import check_amax
from jaxquant.models.walk import iter_variables

SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale", ".pre_quant_scale")
_TAG_OF = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.uint8): "U8"}
_NP_OF_TAG = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype(np.float64)}




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


def linear_entries(it: ExportLinear, export_dtype: np.dtype, checks: DeferredChecks | None = None) -> list[Entry]:
    """Export entries of one quantized linear (weight + scales; bias handled with the params).

    Shapes and dtypes come from the format's ``export_specs``; the values from its jitted
    ``export_tensors``, computed where the weight lives on the first ``produce()`` of the layer
    (they are jax arrays: the shard writer copies them to the host). With ``checks`` the
    finiteness check is deferred to it (no read-back in ``produce()``); without, it runs at once.
    ``input_scale`` is marked ``late`` (it alone depends on the activations); every entry's ``inputs`` are
    the weight amax it was computed from."""
    qf = formats.get(it.fmt)
    out_dim, in_dim = tuple(it.weight.shape)
    specs = qf.export_specs(out_dim, in_dim, input_scale=it.in_amax is not None)

    def compute():
        kw = {"block_amax": it.w_block_amax, "in_amax": None, "compute_dtype": export_dtype,
              "what": it.hf + ".weight"}
        if checks is None:
            return qf.export_tensors(it.weight.on_device(), it.w_amax, **kw)
        checks.poll()
        out, check = qf.export_tensors_deferred(it.weight.on_device(), it.w_amax, **kw)
        checks.add(check)
        from jaxquant.mesh import settle

        return settle(out)  # one computation at a time over a CPU mesh (jaxquant.mesh.settle)

    def input_scale():  # apart from the weight's kernel: the one tensor that depends on the activations
        return qf.input_scale(np.float32(it.in_amax), what=f"{it.hf}.input_quantizer amax").reshape(())

    once = _Once(compute, [k for k, _, _ in specs if k != "input_scale"])
    inputs = (it.w_amax, it.w_block_amax)
    return [Entry(f"{it.hf}.{k}", s, d, input_scale, late=True) if k == "input_scale"
            else Entry(f"{it.hf}.{k}", s, d, (lambda k=k: once.get(k)), inputs=inputs) for k, s, d in specs]


def warm_export_kernels(model, dtype, *, name_map=None) -> int:
    """Compile the export kernels ``model``'s quantized linears will need, by running each distinct one once on
    zeros (so JAX's own cache holds them when ``export_hf`` calls them). ``model`` may be abstract (built with
    ``abstract_model``, the recipe applied, nothing calibrated): only shapes, dtypes and formats are read.
    ``dtype`` is the export dtype of the weights. Returns how many kernels ran. Used by ``calibration.ahead``
    while the checkpoint loads; a kernel that turns out different at export is simply compiled then.
    """
    seen = set()
    dtype = np.dtype(dtype)
    for it in walk(model, name_map, need_amax=True).linears:
        if it.fmt is None:
            continue
        key = (it.fmt, tuple(it.weight.shape), it.w_block_amax is None, np.shape(it.w_amax),
               np.shape(it.w_block_amax))
        if key in seen:
            continue
        seen.add(key)
        out, _ = formats.get(it.fmt).export_tensors_deferred(
            jnp.zeros(tuple(it.weight.shape), dtype), it.w_amax, block_amax=it.w_block_amax, in_amax=None,
            compute_dtype=dtype, what=it.hf + ".weight")
        jax.block_until_ready(out)
    return len(seen)


def _cast_entry(name: str, arr, dtype: np.dtype) -> Entry:
    def produce():
        a = np.asarray(arr)
        return a if a.dtype == dtype else a.astype(dtype)

    return Entry(name, tuple(arr.shape), np.dtype(dtype), produce)


def _not_yet():
    raise AssertionError("a late export tensor was produced before its activations were calibrated")


def _np_dtype(a) -> np.dtype:
    return np.dtype(a.dtype)


def plan_entries(model_or_loaded, *, dtype=None, name_map=None, source_dir=None, gguf: bool | None = None,
                 extra_tensors: Mapping[str, Any] | None = None,
                 amax_out: dict[str, float] | None = None,
                 checks: DeferredChecks | None = None,
                 activations: bool = True, calibrated: bool = True,
                 include: Callable[[str], bool] | None = None) -> tuple[list[Entry], dict[str, Any], str | None]:
    """The exported tensors (lazy) plus the per-layer formats and KV algo, without writing anything.

    ``activations`` False plans an export whose weights are calibrated but whose activations are not yet
    (``export.early``): the entries that depend on activation statistics (``input_scale``, ``k_scale``,
    ``v_scale``) are placeholders marked ``late`` that must not be produced; plan again once calibrated.

    ``checks`` (a ``DeferredChecks``), when given, collects the quantized layers' finiteness checks
    instead of each ``produce()`` waiting for its own; call ``checks.finish()`` after writing.
    ``amax_out``, when given, receives the exact activation / KV amax behind each exported
    ``input_scale`` / ``k_scale`` / ``v_scale`` (dense linears and attention; by quantizer name).

    ``calibrated`` False (with ``activations`` False): the layout only, of a configured model whose weights are not
    calibrated (or not even loaded: ``ShapeDtypeStruct`` parameters); names, shapes and dtypes are right, no entry
    may be produced (``export.streamed``). ``include(canonical HF name)``: plan only the tensors (and quantizers)
    it accepts, e.g. one decoder layer of a streamed export.

    Returns ``(entries, layers, kv_algo)`` where ``layers`` is ``{hf module: (format, block)}``.

    Raises:
      ExportError: a quantizer holds no calibrated amax (``check_calibrated``).
    """
    model = unwrap(model_or_loaded)
    if calibrated:
        check_calibrated(model, weights_only=not activations, include=include)
    elif activations:
        raise ValueError("plan_entries: calibrated=False plans a layout, which needs activations=False")
    if not activations:
        amax_out = None
    nm = name_map_of(model, name_map or getattr(model_or_loaded, "name_map", None))
    if source_dir is None:
        source_dir = getattr(model_or_loaded, "source_dir", None)
    if gguf is None:
        gguf = getattr(model_or_loaded, "gguf_file", None) is not None
    if extra_tensors is None:
        extra_tensors = getattr(model_or_loaded, "extra_tensors", None) or {}
    src = _SourceDtypes(Path(source_dir) if source_dir is not None else None, nm, gguf)
    fixed_dtype = np.dtype(dtype) if dtype is not None else None

    walked = walk(model, nm, need_amax=True, activations=activations, include=include)
    items = walked.linears
    norms = resmooth(items, model)
    unify(items)
    kv = kv_algo(walked.kv)

    entries: list[Entry] = []
    # ---- parameters that are no linear's weight, by their HF name
    consumed = {it.param_path for it in items}
    for path, var in iter_variables(model, nnx.Param):
        dotted_path = ".".join(str(p) for p in path)
        if dotted_path in consumed:
            continue
        name = nm.hf_name(dotted_path)
        if include is not None and not include(name):
            continue
        arr = norms.get(dotted_path, variable_value(var))
        entries.append(_cast_entry(name, arr, fixed_dtype or src.dtype(name, _np_dtype(arr))))
    # ---- linears (per expert for stacked experts): quantized, or the weight in [out, in]
    for it in items:
        target = fixed_dtype or src.dtype(it.hf + ".weight", _np_dtype(it.weight))
        if it.fmt is not None:
            entries.extend(linear_entries(it, target, checks))
            if it.pqs is not None:
                entries.append(_cast_entry(it.hf + ".pre_quant_scale", it.pqs, target))
        else:
            entries.append(_cast_entry(it.hf + ".weight", it.weight, target))
        if amax_out is not None and it.expert is None and it.fmt is not None:
            if it.in_amax is not None:
                amax_out[src.rename(it.hf + ".input_quantizer")] = float(np.float32(it.in_amax))
            if formats.get(it.fmt).sidecar_weight_amax:
                amax_out[src.rename(it.hf + ".weight_quantizer")] = float(np.float32(it.w_amax))
    # ---- KV scales
    for hf, qs in walked.kv.items():
        for role, proj, key in (("k_bmm_quantizer", "k_proj", "k_scale"), ("v_bmm_quantizer", "v_proj", "v_scale")):
            q = qs.get(role)
            cfg = config_of(q)
            if cfg is None or cfg.fixed_amax is not None or cfg.is_dynamic:
                continue
            if not activations:  # the scale and an affine bias come from the activations: placeholders
                entries.append(Entry(f"{hf}.{proj}.{key}", (), np.dtype(np.float32), _not_yet, late=True))
                if q.bias is not None:
                    shape = tuple(np.shape(variable_value(q.bias)))
                    entries.append(Entry(f"{hf}.{proj}.{key[0]}_bias", (shape[0], shape[2], shape[1], shape[3]),
                                         fixed_dtype or src.dtype(f"{hf}.{proj}.weight", np.dtype(np.float32)),
                                         _not_yet, late=True))
                continue
            amax = np.asarray(variable_value(q.amax)).astype(np.float32)
            check_amax(np.max(amax), f"{hf}.{role} amax")
            val = formats.kv_scale(np.max(amax)).reshape(())
            if amax_out is not None:
                amax_out[src.rename(f"{hf}.{role}")] = float(np.max(amax))
            entries.append(Entry(f"{hf}.{proj}.{key}", (), np.dtype(np.float32), lambda v=val: v, late=True))
            if q.bias is not None:  # affine KV: ModelOpt's [1, heads, 1, head_dim] bias in the activations' dtype
                bias = np.asarray(variable_value(q.bias), np.float32).transpose(0, 2, 1, 3)
                dt = fixed_dtype or src.dtype(f"{hf}.{proj}.weight", np.dtype(np.float32))
                entries.append(Entry(f"{hf}.{proj}.{key[0]}_bias", bias.shape, dt,
                                     lambda b=bias, dt=dt: b.astype(dt), late=True))
    # ---- tensors the text model does not own, byte for byte
    taken = {e.name for e in entries}
    for name, lazy in extra_tensors.items():
        if name in taken or (include is not None and not include(name)):
            continue
        tag = getattr(lazy, "dtype", None)
        shape = tuple(lazy.shape)
        from jaxquant.io.safetensors import DTYPES

        np_dtype = DTYPES[tag] if isinstance(tag, str) else np.dtype(tag if tag is not None else np.asarray(lazy).dtype)
        entries.append(Entry(name, shape, np_dtype, (lambda t=lazy: t.get() if hasattr(t, "get") else np.asarray(t))))
    if src.reverse:
        entries = [dataclasses.replace(e, name=src.rename(e.name)) for e in entries]
    entries.sort(key=lambda e: natural_key(e.name))
    layers: dict[str, tuple[str | None, int]] = {}
    # ModelOpt attaches (disabled) quantizers to embeddings too, so they are listed as unquantized; but
    # not to Gemma's scaled embeddings (``Gemma3/4TextScaledWordEmbedding`` subclass nn.Embedding, and
    # ModelOpt's registry quantizes exact classes only), which therefore stay out of exclude_modules.
    for hf in walked.embeddings:
        layers[hf] = (None, 0)
    fused = fused_expert_layers(items)
    for it in items:
        layers[fused.get(it.hf, it.hf)] = (it.fmt, formats.get(it.fmt).block_size if it.fmt is not None else 0)
    if getattr(model, "lm_head", "absent") is None:
        layers.setdefault("lm_head", (None, 0))  # tied: ModelOpt still lists the (tied) lm_head Linear
    layers = {src.rename(k + ".")[:-1]: layers[k] for k in sorted(layers, key=hf_order_key)}
    return entries, layers, kv


def fused_expert_layers(items) -> dict[str, str]:
    """``{expert linear's HF name: its experts module's name}`` for the MoE experts whose projections all share one
    format: ModelOpt (transformers 5's fused experts, ``_QuantFusedExperts``) lists such a module once in
    ``quantized_layers`` / ``config_groups`` (``model.layers.0.mlp.experts``), which is also the prefix vLLM's fused-MoE
    layer looks itself up by, while the tensors stay per expert. Modules whose projections differ keep one entry per
    projection."""
    by_module: dict[str, list] = {}
    for it in items:
        if it.expert is not None:
            by_module.setdefault(it.expert[0], []).append(it)
    out: dict[str, str] = {}
    for module, members in by_module.items():
        if len({m.fmt for m in members}) == 1:
            out.update((m.hf, module) for m in members)
    return out
