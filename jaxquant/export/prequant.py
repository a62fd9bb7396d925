"""``pre_quant_scale`` at export: ModelOpt's ``requantize_resmooth_fused_llm_layers`` for smoothed linears.

A linear smoothed by SmoothQuant or AWQ multiplies its input by ``pre_quant_scale`` (``p``). Serving engines run
fused siblings (q/k/v, gate/up: ``finalize.fused_sibling_groups``) as one GEMM on one input, so ModelOpt's export
(``preprocess_linear_fusion``) gives every member of a group (format other than FP8 / unquantized) the mean of their
``p`` and re-smooths each weight whose ``p`` changes: ``W <- round_dtype(W * p_old / p_new)``, then recalibrates its
weight amax. For AWQ formats (``int4_awq``) the group's ``p`` is then folded into the norm that produces its input
(``input_layernorm`` for q/k/v, ``post_attention_layernorm`` / Gemma's ``pre_feedforward_layernorm`` for gate/up):
``w <- w * p`` (``(1 + w) * p - 1`` for Gemma's offset norms) and the members write no ``pre_quant_scale``. Every
other smoothed linear writes ``<linear>.pre_quant_scale`` (``[in]``, the model dtype). NVFP4-AWQ's folding into the
previous linear (``fuse_prequant_to_linear``) is not implemented: such exports are refused, and so are SVDQuant's
(``SVDQUANT_EXPORT``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant.calibration.finalize import fused_sibling_groups
from jaxquant.errors import UnsupportedError
from jaxquant.numerics._exact import div

#: Export formats whose linears may carry a pre_quant_scale (ModelOpt's INT8 SmoothQuant and INT4 AWQ).
PQS_FORMATS = ("int8_sq", "int4_awq", "w4a8_awq")
#: Why an SVDQuant model (a weight quantizer with low-rank factors) is not exported.
SVDQUANT_EXPORT = (
    "svdquant's NVFP4_SVD checkpoint is not exported by jaxquant yet. nvidia-modelopt 0.47 writes one (the NVFP4 "
    "residual weights, <linear>.pre_quant_scale, <linear>.weight_quantizer._svdquant_lora_a [r, in] and "
    "_svdquant_lora_b [out, r] in the model dtype, fused q/k/v and gate/up re-smoothed to one scale with a joint "
    "SVD), but vLLM rejects NVFP4_SVD (vllm#45333). Keep the fake-quantized model (or save it with --export-format "
    "orbax), or drop --export-path.")
#: Formats whose fused groups ModelOpt leaves alone (``QUANTIZATION_FP8``, ``QUANTIZATION_FP8_PB_REAL``).
_NO_FUSION = ("fp8", "fp8_pb_real")
_NORM_OF = {"self_attn": ("input_layernorm",), "mlp": ("pre_feedforward_layernorm", "post_attention_layernorm")}


class ArrayWeight:
    """An ``[out, in]`` weight computed at export (a re-smoothed one); the interface of ``linears.SiteWeight``."""

    def __init__(self, a):
        self.a = a
        self.shape = tuple(a.shape)
        self.dtype = np.dtype(a.dtype)

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.a)
        return a if dtype is None else a.astype(dtype)

    def on_device(self):
        return self.a


def pre_quant_scale_of(it) -> np.ndarray | None:
    """The input quantizer's pre_quant_scale of an export linear (float32 ``[in]``), or None."""
    iq = it.iq
    p = getattr(iq, "pre_quant_scale", None) if iq is not None else None
    return None if p is None else np.asarray(p.value, np.float32)


def _module(model, path: str):
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part, None)
        if m is None:
            return None
    return m


def _feeding_norm(model, it) -> tuple[str, Any] | None:
    """(NNX path of the norm's weight, the norm module) that produces ``it``'s input, by the decoder's names."""
    parts = it.param_path.split(".")  # ...layers.0.self_attn.q_proj.weight
    if len(parts) < 4 or parts[-3] not in _NORM_OF:
        return None
    layer = ".".join(parts[:-3])
    for name in _NORM_OF[parts[-3]]:
        norm = _module(model, f"{layer}.{name}")
        if norm is not None and getattr(norm, "weight", None) is not None:
            return f"{layer}.{name}.weight", norm
    return None


def _fold_into_norm(norm, p: np.ndarray):
    """The norm weight with ``p`` folded in, in its dtype, rounding after each operation as torch does."""
    w = jnp.asarray(norm.weight[...])
    ps = jnp.asarray(p).astype(w.dtype)
    if getattr(norm, "offset", 0):
        return ((w + jnp.asarray(1.0, w.dtype)) * ps - jnp.asarray(1.0, w.dtype)).astype(w.dtype)
    return (w * ps).astype(w.dtype)


def resmooth(items: list, model) -> dict[str, Any]:
    """The module doc's steps, in place on the export linears (``pqs``, ``weight``, ``w_amax``). Returns
    ``{NNX path of a norm weight: its folded value}``.

    Raises:
      UnsupportedError: a pre_quant_scale on a format other than ``PQS_FORMATS`` or on stacked experts.
    """
    for it in items:
        if getattr(it.wq, "svdquant_lora_a", None) is not None:
            raise UnsupportedError(f"{it.hf}: {SVDQUANT_EXPORT}")
        it.pqs = pre_quant_scale_of(it)
        if it.pqs is not None and (it.fmt not in PQS_FORMATS or it.expert is not None):
            raise UnsupportedError(f"{it.hf}: a pre_quant_scale with format {it.fmt}"
                                   f"{' on stacked experts' if it.expert is not None else ''} cannot be exported yet "
                                   f"(supported: {', '.join(PQS_FORMATS)}).")
    plain = {it.hf: it for it in items if it.expert is None and it.fmt is not None}
    norms: dict[str, Any] = {}
    for group in fused_sibling_groups(list(plain)):
        members = [plain[n] for n in group]
        if members[0].fmt in _NO_FUSION or members[0].pqs is None:
            continue
        if any(m.pqs is None for m in members):
            raise UnsupportedError(f"fused siblings {', '.join(group)}: some carry a pre_quant_scale, some do not.")
        dtype = members[0].weight.dtype
        stacked = np.stack([m.pqs for m in members])
        avg = np.asarray(jnp.asarray(np.sum(stacked, axis=0) / np.float32(len(members))).astype(dtype)
                         .astype(jnp.float32))
        for m in members:
            if np.array_equal(m.pqs, avg):
                continue
            w = jnp.asarray(m.weight.on_device())
            new = div(w.astype(jnp.float32) * jnp.asarray(m.pqs), jnp.asarray(avg)[None, :]).astype(w.dtype)
            m.weight = ArrayWeight(new)
            amax = np.asarray(m.wq.reduce_amax(new), np.float32)
            if m.w_block_amax is not None:  # W4A8_AWQ: the INT4 block amax, and the FP8 (global) amax max|w|
                m.w_block_amax = amax.reshape(np.shape(m.w_block_amax))
                amax = amax.max()
            m.w_amax = amax.reshape(np.shape(m.w_amax))
            m.pqs = avg
        if "awq" in members[0].fmt:
            found = _feeding_norm(model, members[0])
            if found is not None:
                path, norm = found
                norms[path] = _fold_into_norm(norm, avg)
                for m in members:
                    m.pqs = None
    return norms


__all__ = ["ArrayWeight", "PQS_FORMATS", "SVDQUANT_EXPORT", "pre_quant_scale_of", "resmooth"]
