"""``pre_quant_scale`` at export: ModelOpt's ``requantize_resmooth_fused_llm_layers`` for smoothed linears.

A linear smoothed by SmoothQuant or AWQ multiplies its input by ``pre_quant_scale`` (``p``). Serving engines run
fused siblings (q/k/v, gate/up: ``finalize.fused_sibling_groups``) as one GEMM on one input, so ModelOpt's export
(``preprocess_linear_fusion``) gives every member of a group (format other than FP8 / unquantized) the mean of their
``p`` and re-smooths each weight whose ``p`` changes: ``W <- round_dtype(W * p_old / p_new)``, then recalibrates its
weight amax (static NVFP4: the per-block amax; the calibrated global amax stays, ``resmooth_keeps_global_amax``).
For AWQ formats (``int4_awq``) the group's ``p`` is then folded into the norm that produces its input
(``input_layernorm`` for q/k/v, ``post_attention_layernorm`` / Gemma's ``pre_feedforward_layernorm`` for gate/up):
``w <- w * p`` (``(1 + w) * p - 1`` for Gemma's offset norms) and the members write no ``pre_quant_scale``. Every
other smoothed linear writes ``<linear>.pre_quant_scale`` (``[in]``, the model dtype).

NVFP4 with a pre_quant_scale exports as ``nvfp4_awq`` / ``nvfp4_static_awq`` (NVFP4_AWQ; each format's
``pqs_format`` says what a smoothed linear of it becomes, None: refused). When the model's first quantized linear
(ModelOpt's ``get_quantization_format(model)``) is such a format (``pqs_into_linear``), ModelOpt's
``fuse_prequant_to_linear`` runs first: in Llama / Qwen3 / Qwen3-MoE attention and MLP blocks (by the model family:
ModelOpt matches the ``LlamaAttention``, ``Qwen3Attention``, ``Qwen3MoeAttention``, ``LlamaMLP``, ``Qwen3MLP``,
``Qwen3MoeMLP`` classes), o_proj's ``p`` is multiplied into v_proj's output rows and down_proj's into up_proj's
(``W[o, :] *= p[o]``, a bias likewise, in the weight dtype; that weight amax recomputed) and o_proj / down_proj write
no ``pre_quant_scale``. A grouped-query o_proj (``p`` longer than v_proj's output) keeps its ``p``, as ModelOpt does
without ``fuse_grouped_heads``. SVDQuant's factors are not exported (``SVDQUANT_EXPORT``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant import formats
from jaxquant.calibration.finalize import fused_sibling_groups
from jaxquant.errors import UnsupportedError
from jaxquant.numerics._exact import div

#: Export formats whose linears may carry a pre_quant_scale (the registry's ``pqs_format``s: SmoothQuant, AWQ).
PQS_FORMATS = tuple(sorted({f.pqs_format for f in formats.FORMATS.values() if f.pqs_format}))
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
#: ModelOpt's ``PQS_FUSE_MODULE_MAPPING`` by jaxquant model family: (block, linear fused into, linear whose p it takes).
_INTO_LINEAR = {family: (("self_attn", "v_proj", "o_proj"), ("mlp", "up_proj", "down_proj"))
                for family in ("llama", "qwen3", "qwen3_moe")}


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


def _set_weight(m, new) -> None:
    """Give export linear ``m`` the re-smoothed weight ``new`` and recompute its weight amax from it."""
    m.weight = ArrayWeight(new)
    if m.fmt is None:
        return
    amax = np.asarray(m.wq.reduce_amax(new), np.float32)
    if m.w_block_amax is not None:  # static blocks: the block amax; W4A8_AWQ's FP8 (global) amax is max|w| too
        m.w_block_amax = amax.reshape(np.shape(m.w_block_amax))
        if formats.get(m.fmt).resmooth_keeps_global_amax:  # static NVFP4: ModelOpt keeps the calibrated global amax
            return
        amax = amax.max()
    m.w_amax = amax.reshape(np.shape(m.w_amax))


def _param_path(it, leaf: str) -> str:
    return it.param_path.rpartition(".")[0] + "." + leaf


def _fuse_into_linears(plain: dict, model) -> dict[str, Any]:
    """ModelOpt's ``fuse_prequant_to_linear`` (module doc) on the plain export linears; returns the folded biases
    ``{NNX path: value}``."""
    family = getattr(getattr(model, "config", None), "family", None)
    biases: dict[str, Any] = {}
    for block, into, src in _INTO_LINEAR.get(family, ()):
        suffix = f".{block}.{src}"
        for name, it in plain.items():
            if not name.endswith(suffix) or it.pqs is None:
                continue
            dst = plain.get(name[: -len(src)] + into)
            if dst is None or dst.weight.shape[0] != it.pqs.shape[0]:
                continue  # grouped-query attention: o_proj keeps its pre_quant_scale (no fuse_grouped_heads)
            w = jnp.asarray(dst.weight.on_device())
            p = jnp.asarray(it.pqs).astype(w.dtype)  # ModelOpt's pre_quant_scale buffer is in the weight dtype
            _set_weight(dst, (w * p[:, None]).astype(w.dtype))
            owner = _module(model, dst.param_path.rpartition(".")[0])
            bias = getattr(owner, "bias", None) if owner is not None else None
            if bias is not None:
                b = jnp.asarray(bias[...])
                biases[_param_path(dst, "bias")] = (b * p.astype(b.dtype)).astype(b.dtype)
            it.pqs = None
    return biases


def resmooth(items: list, model) -> dict[str, Any]:
    """The module doc's steps, in place on the export linears (``fmt``, ``pqs``, ``weight``, ``w_amax``). Returns
    ``{NNX path of a norm weight or a bias: its folded value}``.

    Raises:
      UnsupportedError: a pre_quant_scale on a format without a ``pqs_format`` or on stacked experts.
    """
    for it in items:
        if getattr(it.wq, "svdquant_lora_a", None) is not None:
            raise UnsupportedError(f"{it.hf}: {SVDQUANT_EXPORT}")
        it.pqs = pre_quant_scale_of(it)
        if it.pqs is None:
            continue
        to = formats.get(it.fmt).pqs_format if it.fmt is not None else None
        if to is None or it.expert is not None:
            raise UnsupportedError(f"{it.hf}: a pre_quant_scale with format {it.fmt}"
                                   f"{' on stacked experts' if it.expert is not None else ''} cannot be exported yet "
                                   f"(supported: {', '.join(PQS_FORMATS)}).")
        it.fmt = to
    plain = {it.hf: it for it in items if it.expert is None and it.fmt is not None}
    first = next((it for it in items if it.fmt is not None), None)  # ModelOpt's get_quantization_format(model)
    folded = _fuse_into_linears(plain, model) if first is not None and formats.get(first.fmt).pqs_into_linear else {}
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
            _set_weight(m, div(w.astype(jnp.float32) * jnp.asarray(m.pqs), jnp.asarray(avg)[None, :]).astype(w.dtype))
            m.pqs = avg
        if formats.get(members[0].fmt).pqs_into_norm:
            found = _feeding_norm(model, members[0])
            if found is not None:
                path, norm = found
                folded[path] = _fold_into_norm(norm, avg)
                for m in members:
                    m.pqs = None
    return folded


__all__ = ["ArrayWeight", "PQS_FORMATS", "SVDQUANT_EXPORT", "pre_quant_scale_of", "resmooth"]
