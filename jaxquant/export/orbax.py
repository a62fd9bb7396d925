"""Save / restore a quantized jaxquant model with orbax-checkpoint.

``save_orbax(loaded, "ckpt")`` writes, atomically (``atomic.py``)::

    ckpt/
      jaxquant_orbax.json   # format tag, jaxquant version, HF config.json dict, model dtype,
                            # every quantizer's resolved config (QuantizerConfig.to_dict) and mode,
                            # the recipe's rules when known
      state/                # orbax pytree: {"model": the NNX state (parameters, amax, global amax),
                            #                "export": the ModelOpt export tensors (packed weights,
                            #                          weight_scale(_2), input / KV scales)}

with orbax's current API: ``orbax.checkpoint.v1.save_pytree / load_pytree`` when the installed
orbax has it, else ``StandardCheckpointer``. Every dtype round-trips bit-exactly (bf16, uint8,
float8_e4m3fn).

``restore_orbax("ckpt")`` rebuilds the model from the stored HF config, re-applies each
quantizer's config and mode, and loads the state: the restored model computes the same logits as
the saved one. The export tensors come back in ``OrbaxCheckpoint.export`` (by HF name).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant._version import __version__
from jaxquant.errors import CheckpointError, ExportError
from jaxquant.export.atomic import atomic_directory, is_incomplete

FORMAT = "jaxquant-orbax-v1"
META = "jaxquant_orbax.json"
STATE = "state"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _save_tree(path: Path, tree) -> str:
    ocp = _ocp()
    v1 = getattr(ocp, "v1", None)
    if v1 is not None and hasattr(v1, "save_pytree"):
        v1.save_pytree(str(path), tree)
        return "orbax.checkpoint.v1.save_pytree"
    ck = ocp.StandardCheckpointer()
    ck.save(str(path), tree)
    ck.wait_until_finished()
    return "orbax.checkpoint.StandardCheckpointer"


def _load_tree(path: Path, abstract=None):
    ocp = _ocp()
    v1 = getattr(ocp, "v1", None)
    if v1 is not None and hasattr(v1, "load_pytree"):
        return v1.load_pytree(str(path), abstract) if abstract is not None else v1.load_pytree(str(path))
    ck = ocp.StandardCheckpointer()
    return ck.restore(str(path), abstract) if abstract is not None else ck.restore(str(path))


def _quantizers(model):
    from jaxquant.calibration.sites import quantizer_sites

    return [(s.path, s.quantizer) for s in quantizer_sites(model)]


def _pure(tree):
    """NNX pure dict with string keys (orbax stores dict keys as strings)."""
    if isinstance(tree, dict):
        return {str(k): _pure(v) for k, v in tree.items()}
    return tree


def _model_state(model) -> dict:
    return _pure(nnx.to_pure_dict(nnx.state(model)))


@dataclasses.dataclass
class OrbaxCheckpoint:
    """What ``restore_orbax`` returns: the ``LoadedModel`` and the stored export tensors."""

    loaded: Any
    export: dict[str, Any]
    meta: dict[str, Any]

    @property
    def model(self):
        return self.loaded.model


def save_orbax(
    model_or_loaded,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    resolution=None,
    hf_config: dict | None = None,
    include_export_tensors: bool = True,
) -> Path:
    """Save the quantized model state with orbax (see the module docstring for the layout).

    Args:
      model_or_loaded: a ``LoadedModel`` (its ``hf_config`` is stored) or a model plus ``hf_config``.
      directory: target; refused when non-empty unless ``overwrite``.
      resolution: the recipe resolution; its rules are stored for reference.
      include_export_tensors: also store the ModelOpt export tensors (packed weights and scales); never for an
        SVDQuant model (a warning says so: its NVFP4_SVD export is refused).

    Returns the directory.
    """
    loaded = model_or_loaded if hasattr(model_or_loaded, "model") else None
    model = getattr(model_or_loaded, "model", model_or_loaded)
    cfg = hf_config if hf_config is not None else getattr(loaded, "hf_config", None)
    if not cfg:
        raise ExportError("save_orbax needs the HF config.json contents: pass a LoadedModel or hf_config=.")
    quantizers = {}
    for path, q in _quantizers(model):
        c = q.config if q.enabled else None
        quantizers[path] = {"config": None if c is None else c.to_dict(exmy=True, full=True), "mode": q.mode}
    tree: dict[str, Any] = {"model": _model_state(model)}
    export_names: list[str] = []
    if include_export_tensors and any(getattr(q, "svdquant_lora_a", None) is not None for _, q in _quantizers(model)):
        logging.getLogger("jaxquant.export").warning(
            "save_orbax: an SVDQuant model has no HF export tensors (NVFP4_SVD is not exported); saving its state "
            "only.")
        include_export_tensors = False
    if include_export_tensors:
        from jaxquant.export.entries import plan_entries

        entries, _, _ = plan_entries(model_or_loaded)
        exp = {}
        for e in entries:
            if e.name.endswith((".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")) or (
                e.name.endswith(".weight") and np.dtype(e.dtype).itemsize == 1
            ):
                exp[e.name] = e.produce()
        tree["export"] = {str(i): jnp.asarray(v) for i, v in enumerate(exp.values())}
        export_names = list(exp)
    rules = None
    if resolution is not None and getattr(resolution, "rules", None):
        try:
            rules = [r.to_dict(exmy=True) for r in resolution.rules]
        except Exception:  # noqa: BLE001 - rules are informative only
            rules = None
    dtype = jnp.dtype(model.dtype).name if getattr(model, "dtype", None) is not None else None
    meta = {
        "format": FORMAT,
        "producer": {"name": "jaxquant", "version": __version__},
        "hf_config": cfg,
        "dtype": dtype,
        "quantizers": quantizers,
        "recipe_rules": rules,
        "export_tensor_names": export_names,
    }
    from jaxquant.export.hf import copy_aux_files

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        meta["writer"] = _save_tree(tmp / STATE, tree)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        # tokenizer, chat template and generation config, so `jaxquant eval` works on the directory
        src = getattr(loaded, "source_dir", None)
        copy_aux_files(tmp, Path(src) if src is not None else None, loaded, cfg)
    return Path(directory)


def _set_quantizer(q, entry: dict, amax, global_amax, bias=None, bias_count=None) -> None:
    from jaxquant.quantizer.sequential import config_from_dict
    from jaxquant.quantizer.tensor_quantizer import QuantAmax, QuantBias, QuantBiasCount, QuantGlobalAmax

    cfg = config_from_dict(entry["config"]) if entry["config"] is not None else None
    q.config = cfg
    q.amax = QuantAmax(jnp.asarray(amax, jnp.float32)) if amax is not None else None
    q.global_amax = QuantGlobalAmax(jnp.asarray(global_amax, jnp.float32)) if global_amax is not None else None
    q.bias = QuantBias(jnp.asarray(bias, jnp.float32)) if bias is not None else None  # affine K/V
    q.bias_count = QuantBiasCount(jnp.asarray(bias_count, jnp.float32)) if bias_count is not None else None
    q.mode = entry["mode"]


def restore_orbax(directory: str | os.PathLike, *, dtype=None) -> OrbaxCheckpoint:
    """Rebuild the model saved by ``save_orbax`` (same parameters, amax, quantizer configs and modes)."""
    from jaxquant.converters.hf import LoadedModel
    from jaxquant.converters.names import NameMap
    from jaxquant.models.config import ModelConfig
    from jaxquant.models.decoder import build_model

    d = Path(directory)
    if is_incomplete(d) or not (d / META).is_file():
        raise CheckpointError(f"{d}: not a complete jaxquant orbax checkpoint (no {META}).")
    meta = json.loads((d / META).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / META}: unknown format {meta.get('format')!r} (expected {FORMAT}).")
    tree = _load_tree(d / STATE)
    model_tree = tree["model"]
    hf_config = meta["hf_config"]
    config = ModelConfig.from_hf_config(hf_config, source=str(d / META))
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(meta.get("dtype") or "bfloat16")
    model = build_model(config, dtype=dt)
    for path, q in _quantizers(model):
        entry = meta["quantizers"].get(path)
        if entry is None:
            raise CheckpointError(f"{d}: quantizer {path} is missing from the checkpoint metadata.")
        node = model_tree
        for part in path.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        amax = node.get("amax") if isinstance(node, dict) else None
        gamax, bias, count = (node.get(k) if isinstance(node, dict) else None
                              for k in ("global_amax", "bias", "bias_count"))
        _set_quantizer(q, entry, amax, gamax, bias, count)
        q.set_pre_quant_scale(node.get("pre_quant_scale") if isinstance(node, dict) else None)  # SmoothQuant / AWQ
        q.set_lowrank(*((node.get(k) if isinstance(node, dict) else None)  # SVDQuant
                        for k in ("svdquant_lora_a", "svdquant_lora_b")))
    state = nnx.state(model)
    target = nnx.to_pure_dict(state)

    def fill(tgt, src, where=""):
        out = {}
        for k, v in tgt.items():
            sk = str(k)
            if sk not in src:
                raise CheckpointError(f"{d}: {where}{sk} is missing from the orbax state.")
            out[k] = fill(v, src[sk], f"{where}{sk}.") if isinstance(v, dict) else jnp.asarray(src[sk], v.dtype)
        return out

    nnx.replace_by_pure_dict(state, fill(target, model_tree))
    nnx.update(model, state)
    nm = NameMap.for_config(config)
    loaded = LoadedModel(model, config, {}, hf_config, d, nm)
    export = {}
    if "export" in tree:
        names = meta.get("export_tensor_names", [])
        export = {n: tree["export"][str(i)] for i, n in enumerate(names)}
    return OrbaxCheckpoint(loaded, export, meta)


__all__ = ["OrbaxCheckpoint", "restore_orbax", "save_orbax"]
