"""Calibration state as plain data: ``{"<quantizer>._amax": array, "<quantizer>._global_amax": array}``
(and ``"<quantizer>._bias_value"`` for affine K/V quantizers, ``[1, heads, 1, head_dim]`` as ModelOpt stores it).

Keys are ModelOpt's quantizer names plus ModelOpt's buffer names (``_amax``, and ``_global_amax``
for static-block NVFP4 weights), so a state reads like ModelOpt's quantizer state dict:

    model.layers.0.self_attn.q_proj.input_quantizer._amax     float32 []
    model.layers.0.self_attn.q_proj.weight_quantizer._amax    float32 []
    model.layers.0.self_attn.k_bmm_quantizer._amax            float32 []
    model.layers.1.mlp.experts.5.gate_proj.input_quantizer._amax   (one entry per expert)
    model.layers.0.self_attn.q_proj.input_quantizer._pre_quant_scale   float32 [in]   (SmoothQuant / AWQ)
    model.layers.0.self_attn.q_proj.weight_quantizer._pre_quant_scale  float32 [in]   (its inverse, weight side)
    model.layers.0.self_attn.q_proj.weight_quantizer._svdquant_lora_a  float32 [r, in]   (SVDQuant, model-dtype
    model.layers.0.self_attn.q_proj.weight_quantizer._svdquant_lora_b  float32 [out, r]   values)

Only quantizers that carry calibrated state appear: enabled weight quantizers and data-calibrated
activation quantizers. Disabled, dynamic and constant-amax (KV ``*_cast``) quantizers have none,
as in ModelOpt. ``_pre_quant_scale`` appears for every quantizer that holds one (``TensorQuantizer.pre_quant_scale``,
disabled input quantizers of W4A16 AWQ included). Values are float32 numpy arrays: scalars for per-tensor formats, ``[out, 1]`` per
channel, ``[out, in/16]`` per block (static NVFP4); a stacked expert quantizer contributes one
entry per expert, each without the expert axis.

``save_calibration_state`` writes a state to one ``.safetensors`` file (atomically: a temporary
file beside the target, then a rename), with metadata naming the recipe and the model, so a
failed export can be retried without re-calibrating (``load_calibration_state``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant.calibration.sites import Site, quantizer_sites
from jaxquant.errors import CheckpointError, JaxquantError

AMAX = "_amax"
GLOBAL_AMAX = "_global_amax"
BIAS = "_bias_value"  # affine K/V quantizers: ModelOpt's buffer, in its [1, heads, 1, head_dim] layout
PRE_QUANT_SCALE = "_pre_quant_scale"
LORA = ("_svdquant_lora_a", "_svdquant_lora_b")  # SVDQuant's weight-quantizer factors, [r, in] and [out, r]
FILE_FORMAT = "jaxquant.calibration_state"
FILE_VERSION = "1"


def _instance_value(a: np.ndarray) -> np.ndarray:
    """One expert's slice of a stacked amax: a scalar when it holds one value."""
    return a.reshape(()) if a.size == 1 else a


def calibration_state(model: Any, sites: list[Site] | None = None) -> dict[str, np.ndarray]:
    """The model's calibrated state, keyed ``"<ModelOpt quantizer name>._amax"`` (see module doc).

    This copies the values to the host (one transfer per quantizer).
    """
    sites = quantizer_sites(model) if sites is None else sites
    out: dict[str, np.ndarray] = {}
    for s in sites:
        if s.quantizer.pre_quant_scale is not None:
            if s.stacked:
                raise JaxquantError(f"{s.path}: a pre_quant_scale on stacked experts is not supported")
            out[s.names[0] + "." + PRE_QUANT_SCALE] = np.asarray(s.quantizer.pre_quant_scale.value, np.float32)
        if getattr(s.quantizer, "svdquant_lora_a", None) is not None:  # SVDQuant (never on stacked experts)
            for key in LORA:
                out[s.names[0] + "." + key] = np.asarray(getattr(s.quantizer, key[1:]).value, np.float32)
        if not s.has_state:
            continue
        q = s.quantizer
        amax = np.asarray(q.amax.value, np.float32)
        gamax = np.asarray(q.global_amax.value, np.float32) if q.global_amax is not None else None
        if s.stacked:
            for e, name in enumerate(s.names):
                out[name + "." + AMAX] = _instance_value(amax[e])
                if gamax is not None:
                    out[name + "." + GLOBAL_AMAX] = _instance_value(gamax[e])
        else:
            name = s.names[0]
            out[name + "." + AMAX] = amax
            if gamax is not None:
                out[name + "." + GLOBAL_AMAX] = gamax.reshape(()) if gamax.size == 1 else gamax
            if getattr(q, "bias", None) is not None:
                out[name + "." + BIAS] = np.asarray(q.bias.value, np.float32).transpose(0, 2, 1, 3)
    return out


def _load_lowrank(s: Site, state: Mapping[str, Any], used: set[str]) -> None:
    """Set (or clear, when absent) a quantizer's SVDQuant factors from ``state``; checks they fit its weight."""
    keys = [f"{s.names[0]}.{key}" for key in LORA]
    present = [k for k in keys if k in state]
    if not present:
        s.quantizer.set_lowrank(None, None)
        return
    if len(present) == 1 or s.role != "weight":
        raise CheckpointError(f"{s.names[0]}: SVDQuant factors need both {' and '.join(keys)} on a weight "
                              f"quantizer; found {', '.join(present)}.")
    a, b = (np.asarray(state[k], np.float32) for k in keys)
    out, inp = tuple(s.weight().shape)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != inp or b.shape != (out, a.shape[0]):
        raise CheckpointError(f"{s.names[0]}: SVDQuant factors of shapes {list(a.shape)} and {list(b.shape)} do not "
                              f"fit the [{out}, {inp}] weight (expected [r, {inp}] and [{out}, r]).")
    s.quantizer.set_lowrank(a, b)
    used.update(keys)


def load_calibration_state(model: Any, state: Mapping[str, Any], *, strict: bool = True,
                           sites: list[Site] | None = None) -> None:
    """Write ``state`` (as returned by ``calibration_state``) back into the model's quantizers.

    The model must already be configured with the same recipe (``apply_recipe``).

    Args:
      strict: every state-bearing quantizer must be present in ``state`` and every key of
        ``state`` must belong to one.

    Raises:
      CheckpointError: missing or unexpected keys (strict), or a shape that does not fit.
    """
    sites = quantizer_sites(model) if sites is None else sites
    used: set[str] = set()
    missing: list[str] = []
    for s in sites:
        pkey = f"{s.names[0]}.{PRE_QUANT_SCALE}"
        if not s.stacked:  # the state holds every pre_quant_scale there is: absent means none
            s.quantizer.set_pre_quant_scale(state.get(pkey))
            if pkey in state:
                used.add(pkey)
            _load_lowrank(s, state, used)
        if not s.has_state:
            continue
        q = s.quantizer
        for attr, key in (("amax", AMAX), ("global_amax", GLOBAL_AMAX), ("bias", BIAS)):
            var = getattr(q, attr, None)
            if var is None:
                continue
            target = tuple(var.value.shape)
            if attr == "bias":  # stored in ModelOpt's [1, heads, 1, D] layout
                target = (target[0], target[2], target[1], target[3])
            keys = [f"{n}.{key}" for n in s.names]
            if any(k not in state for k in keys):
                missing += [k for k in keys if k not in state]
                continue
            try:
                if s.stacked:
                    per = target[1:]
                    vals = [np.asarray(state[k], np.float32).reshape(per) for k in keys]
                    value = np.stack(vals)
                else:
                    value = np.asarray(state[keys[0]], np.float32).reshape(target)
                    if attr == "bias":
                        value = value.transpose(0, 2, 1, 3)
            except ValueError:
                got = [tuple(np.shape(state[k])) for k in keys[:2]]
                raise CheckpointError(
                    f"calibration state {keys[0]!r} has shape {got[0]}, which does not fit the quantizer "
                    f"(amax shape {target}); the state belongs to another model or recipe."
                ) from None
            var.value = jnp.asarray(value, jnp.float32)
            used.update(keys)
    if strict:
        unexpected = sorted(set(state) - used)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (first: {missing[0]!r})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r})")
            raise CheckpointError(
                "the calibration state does not match this model and recipe: " + ", ".join(parts)
                + ". Load it into the model and recipe it was calibrated with."
            )


def save_calibration_state(path: str | os.PathLike, state: Mapping[str, Any],
                           metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` to ``path`` (``.safetensors``) atomically; returns the path.

    ``metadata`` values are stored as strings (non-strings as JSON).
    """
    from jaxquant.io.safetensors import save_file_atomic

    path = Path(path)
    meta = {"format": FILE_FORMAT, "version": FILE_VERSION}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    try:
        save_file_atomic({k: np.asarray(v, np.float32) for k, v in state.items()}, path, meta)
    except OSError as e:
        raise CheckpointError(f"writing the calibration state {path} failed ({e.strerror or e}); nothing was left "
                              "there. Free space or choose another path.") from None
    return path


def read_calibration_state(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(state, metadata)`` from a file written by ``save_calibration_state``."""
    from jaxquant.io.safetensors import SafetensorsFile

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such calibration state file.")
    try:
        f = SafetensorsFile(path)
    except JaxquantError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from None
    meta = dict(f.metadata)
    if meta.get("format") != FILE_FORMAT:
        raise CheckpointError(f"{path}: not a jaxquant calibration state (metadata format {meta.get('format')!r}).")
    state = {k: np.array(f.get(k), np.float32) for k in f.keys()}
    f.close()
    return state, meta


__all__ = [
    "AMAX",
    "GLOBAL_AMAX",
    "PRE_QUANT_SCALE",
    "calibration_state",
    "load_calibration_state",
    "read_calibration_state",
    "save_calibration_state",
]
