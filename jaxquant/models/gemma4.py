"""Gemma 4 text decoder (``Gemma4ForCausalLM`` and the text stack of ``Gemma4ForConditionalGeneration``).

Follows transformers 5.24 ``models/gemma4/modeling_gemma4.py`` (``Gemma4TextModel``,
``Gemma4TextDecoderLayer``, ``Gemma4TextAttention``, ``Gemma4TextRouter``, ``Gemma4TextExperts``); every
feature of the text model is implemented (docs/moe.md §6):

* per-layer attention geometry: sliding layers ``head_dim`` / ``num_key_value_heads``, full-attention layers
  ``global_head_dim`` and (iff ``attention_k_eq_v``) ``num_global_key_value_heads``, or an explicit
  ``per_layer_config``;
* ``attention_k_eq_v`` on full layers (no ``v_proj``; values are the raw ``k_proj`` output), q/k norms with weight,
  ``v_norm`` without, attention scale 1.0;
* per-layer-type RoPE (``proportional`` with ``partial_rotary_factor`` on full layers);
* RMSNorm ``x * (mean(x^2) + eps)^-0.5 * w`` computed in float32 (plain weight, not Gemma 3's ``1 + w``);
* sandwich norms, embedding scale sqrt(hidden), final logit soft-capping, per-layer ``layer_scalar``;
* the MoE block (dense ``mlp`` + ``router`` + ``experts`` summed between extra norms);
* per-layer embeddings (PLE), KV sharing across the last ``num_kv_shared_layers`` layers, double-wide MLP.

NNX paths mirror transformers' (``model.layers.L.router.proj``, ``model.layers.L.experts``), so ModelOpt's
quantizer names (``...layers.L.experts.{e}.gate_proj.weight_quantizer``, router excluded by ``*router*``) and
the HF tensor names follow from the family's ``text_prefix``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.errors import CheckpointError, UnsupportedError
from jaxquant.models.config import FULL, SLIDING, ModelConfig, RopeConfig
from jaxquant.models.decoder import CausalLM, StagedTextModel, positions_from_mask
from jaxquant.models.layers import (
    ACTIVATIONS,
    MLP,
    Attention,
    Embedding,
    Linear,
    RMSNorm,
    apply_rope,
    attention_mask as build_mask,
    dot_product_attention,
    rope_cos_sin,
    rope_inv_freq,
)
from jaxquant.models.moe import EXPERT_NAMES_QWEN, MoeExperts, route_topk
from jaxquant.quantizer import TensorQuantizer

# ----------------------------------------------------------------------------------------------- config

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def gemma4_config_hook(t: Mapping[str, Any], fields: dict[str, Any]) -> None:
    """Gemma 4 specifics on top of the generic parsing (see ``Gemma4TextConfig.__post_init__``)."""
    n = fields["num_hidden_layers"]
    layer_types = list(fields["layer_types"])
    if layer_types and layer_types[-1] != FULL:  # transformers forces the last layer to full attention
        layer_types[-1] = FULL
    fields["layer_types"] = tuple(layer_types)
    if t.get("use_bidirectional_attention") == "all":
        raise UnsupportedError("Gemma 4 with use_bidirectional_attention='all' (encoder mode) is not supported.")

    # RoPE: per layer type; the config class supplies both types when rope_parameters is absent.
    rp = t.get("rope_parameters")
    if not (isinstance(rp, Mapping) and any(k in (FULL, SLIDING) for k in rp)):
        rp = _DEFAULT_ROPE
    fields["rope"] = tuple(
        sorted(
            (lt, RopeConfig.from_hf(rp.get(lt) or _DEFAULT_ROPE[lt], max_position_embeddings=fields[
                "max_position_embeddings"], where=f"rope_parameters[{lt}]"))
            for lt in set(layer_types)
        )
    )

    # Per-layer head_dim / KV heads.
    head_dim = fields["head_dim"]
    kv = fields["num_key_value_heads"]
    k_eq_v = bool(t.get("attention_k_eq_v", False))
    dims = [head_dim] * n
    kvs = [kv] * n
    plc = t.get("per_layer_config")
    if plc:
        for key, over in dict(plc).items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise CheckpointError(f"per_layer_config key {key!r} is not a layer index") from None
            if not 0 <= i < n:
                raise CheckpointError(f"per_layer_config names layer {i} of {n}")
            for attr, value in dict(over).items():
                if attr == "head_dim":
                    dims[i] = int(value)
                elif attr == "num_key_value_heads":
                    kvs[i] = int(value)
                else:
                    raise UnsupportedError(f"Gemma 4 per_layer_config override {attr!r} (layer {i}) is not supported.")
    else:
        global_head_dim = int(t.get("global_head_dim") or 512)
        global_kv = t.get("num_global_key_value_heads") if k_eq_v else None
        for i, lt in enumerate(layer_types):
            if lt == FULL:
                dims[i] = global_head_dim
                if global_kv is not None:
                    kvs[i] = int(global_kv)

    n_shared = int(t.get("num_kv_shared_layers") or 0)
    if n_shared >= n and n_shared:
        raise UnsupportedError("Gemma 4 with every layer KV-shared (no producer layer) is not supported.")
    if n_shared:
        first = n - n_shared
        if set(layer_types[:first]) != set(layer_types):
            raise CheckpointError("Gemma 4: a KV-shared layer type has no earlier layer producing its cache.")

    moe = bool(t.get("enable_moe_block", False))
    extras = dict(fields.get("extras") or ())
    extras.update(
        layer_head_dims=tuple(dims),
        layer_kv_heads=tuple(kvs),
        attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=n_shared,
        hidden_size_per_layer_input=int(t.get("hidden_size_per_layer_input", 256) or 0),
        vocab_size_per_layer_input=int(t.get("vocab_size_per_layer_input") or fields["vocab_size"]),
        use_double_wide_mlp=bool(t.get("use_double_wide_mlp", False)),
        enable_moe_block=moe,
    )
    fields["extras"] = extras
    fields["attention_scale"] = 1.0
    fields["norm_offset"] = 0.0
    if moe:
        e = int(t.get("num_experts") or 0)
        k = int(t.get("top_k_experts") or 0)
        inter = t.get("moe_intermediate_size")
        if e <= 0 or k <= 0 or not inter:
            raise CheckpointError("Gemma 4 enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size.")
        fields.update(num_experts=e, num_experts_per_tok=k, moe_intermediate_size=int(inter), norm_topk_prob=True)


def kv_sharing_modes(config: ModelConfig) -> list[str | None]:
    """Per layer: None (own KV), "store" (own KV, later layers reuse it) or "reuse" (``kv_sharing_modes``)."""
    n = config.num_hidden_layers
    n_shared = config.extra("num_kv_shared_layers", 0)
    if not n_shared:
        return [None] * n
    first = n - n_shared
    modes: list[str | None] = [None if i < first else "reuse" for i in range(n)]
    types = [config.layer_type(i) for i in range(n)]
    for lt in set(types):
        last = max(i for i in range(first) if types[i] == lt)
        modes[last] = "store"
    return modes


# ----------------------------------------------------------------------------------------------- layers


class Gemma4RMSNorm(RMSNorm):
    """``Gemma4RMSNorm``: ``(x * (mean(x^2) + eps)^-0.5 * w)`` in float32, cast back (plain weight, init 1)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight[...].astype(jnp.float32)
        return h.astype(dtype)


def _times(x: jax.Array, c: float) -> jax.Array:
    """``x * c`` for a Python scalar as torch computes it: in float32, rounded once to ``x``'s dtype."""
    return (x.astype(jnp.float32) * jnp.float32(c)).astype(x.dtype)


def _norm(dim: int, config: ModelConfig, dtype, with_scale: bool = True) -> Gemma4RMSNorm:
    return Gemma4RMSNorm(dim, eps=config.rms_norm_eps, offset=0.0, with_scale=with_scale, dtype=dtype)


class Gemma4Attention(Attention):
    """``Gemma4TextAttention`` with ModelOpt's quantizer sites (projections + ``{q,k,v,p}_bmm_quantizer``).

    An ``Attention`` for everything that looks for attention modules (the loaders configure its KV
    fake quant from ``k_proj.k_scale`` / ``v_proj.v_scale``), with its own geometry and forward; it
    does not run ``Attention.__init__``.

    KV-shared layers (``mode == "reuse"``) have no ``k_proj`` / ``v_proj`` / ``k_norm`` / ``v_norm`` and attend to
    the post-norm, post-RoPE keys and values stored by the producing layer; their own ``k_bmm_quantizer`` /
    ``v_bmm_quantizer`` still act on what they attend to.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.layer_type = c.layer_type(layer_idx)
        self.sliding_window = c.layer_sliding_window(layer_idx)
        self.head_dim = c.extra("layer_head_dims")[layer_idx]
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.extra("layer_kv_heads")[layer_idx]
        self.scaling = c.scaling
        self.kv_mode = kv_sharing_modes(c)[layer_idx]
        self.k_eq_v = bool(c.extra("attention_k_eq_v")) and self.layer_type != SLIDING
        hd, h = self.head_dim, c.hidden_size
        self.q_proj = Linear(h, self.num_heads * hd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.q_norm = _norm(hd, c, dtype)
        if self.kv_mode != "reuse":
            self.k_norm = _norm(hd, c, dtype)
            self.v_norm = _norm(hd, c, dtype, with_scale=False)
            self.k_proj = Linear(h, self.num_kv_heads * hd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
            self.v_proj = (
                None if self.k_eq_v else Linear(h, self.num_kv_heads * hd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
            )
        else:
            self.k_norm = self.v_norm = self.k_proj = self.v_proj = None
        self.o_proj = Linear(self.num_heads * hd, h, use_bias=c.o_bias, dtype=dtype, rngs=rngs)
        self.q_bmm_quantizer = TensorQuantizer()
        self.k_bmm_quantizer = TensorQuantizer()
        self.v_bmm_quantizer = TensorQuantizer()
        self.p_bmm_quantizer = TensorQuantizer()

    def __call__(self, x, *, cos, sin, mask, shared_kv: dict, token_mask=None):
        b, s, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x, token_mask=token_mask).reshape(b, s, self.num_heads, hd)
        q = apply_rope(self.q_norm(q), cos, sin)
        if self.kv_mode == "reuse":
            k, v = shared_kv[self.layer_type]
        else:
            k = self.k_proj(x, token_mask=token_mask).reshape(b, s, self.num_kv_heads, hd)
            v = k if self.v_proj is None else self.v_proj(x, token_mask=token_mask).reshape(b, s, self.num_kv_heads, hd)
            k = apply_rope(self.k_norm(k), cos, sin)
            v = self.v_norm(v)
            if self.kv_mode == "store":
                shared_kv[self.layer_type] = (k, v)
        q = self.q_bmm_quantizer(q, token_mask=token_mask)
        k = self.k_bmm_quantizer(k, token_mask=token_mask)
        v = self.v_bmm_quantizer(v, token_mask=token_mask)
        out = dot_product_attention(q, k, v, mask, scaling=self.scaling, probs_quantizer=self.p_bmm_quantizer)
        return self.o_proj(out.reshape(b, s, self.num_heads * hd), token_mask=token_mask)


class Gemma4Router(nnx.Module):
    """``Gemma4TextRouter``: ``proj(rms_norm_noscale(x) * scale * H^-0.5)`` -> softmax -> top-k -> renormalise
    -> ``* per_expert_scale[index]``. ``proj`` is a quantizer-bearing ``Linear`` (recipes exclude ``*router*``)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.hidden_size = c.hidden_size
        self.top_k = c.num_experts_per_tok
        self.norm = _norm(c.hidden_size, c, dtype, with_scale=False)
        self.proj = Linear(c.hidden_size, c.num_experts, use_bias=False, dtype=dtype, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((c.hidden_size,), dtype))
        self.per_expert_scale = nnx.Param(jnp.ones((c.num_experts,), dtype))

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        h = self.norm(x)
        h = _times(h * self.scale[...].astype(h.dtype), self.hidden_size**-0.5)
        logits = self.proj(h, token_mask=token_mask)
        return route_topk(
            logits, self.top_k, renormalize=True, weights_dtype=jnp.float32, per_expert_scale=self.per_expert_scale[...]
        )


class Gemma4DecoderLayer(nnx.Module):
    """``Gemma4TextDecoderLayer``: attention, dense MLP (+ MoE block), PLE, ``layer_scalar``."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        h = c.hidden_size
        self.layer_type = c.layer_type(layer_idx)
        self.input_layernorm = _norm(h, c, dtype)
        self.self_attn = Gemma4Attention(c, layer_idx, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = _norm(h, c, dtype)
        self.pre_feedforward_layernorm = _norm(h, c, dtype)
        self.post_feedforward_layernorm = _norm(h, c, dtype)
        wide = c.extra("use_double_wide_mlp") and self.self_attn.kv_mode == "reuse"
        self.mlp = MLP(c, layer_idx, dtype=dtype, rngs=rngs, intermediate_size=c.intermediate_size * (2 if wide else 1))
        self.enable_moe = bool(c.extra("enable_moe_block"))
        if self.enable_moe:
            self.router = Gemma4Router(c, dtype=dtype, rngs=rngs)
            self.experts = MoeExperts(
                c.num_experts,
                h,
                c.moe_intermediate_size,
                act=c.hidden_act,
                expert_names=EXPERT_NAMES_QWEN,  # ModelOpt: Gemma4 experts export as gate_proj/up_proj/down_proj
                dtype=dtype,
                rngs=rngs if rngs is not None else nnx.Rngs(0),
            )
            self.post_feedforward_layernorm_1 = _norm(h, c, dtype)
            self.post_feedforward_layernorm_2 = _norm(h, c, dtype)
            self.pre_feedforward_layernorm_2 = _norm(h, c, dtype)
        else:
            self.router = self.experts = None
            self.post_feedforward_layernorm_1 = self.post_feedforward_layernorm_2 = None
            self.pre_feedforward_layernorm_2 = None
        self.ple_dim = int(c.extra("hidden_size_per_layer_input") or 0)
        if self.ple_dim:
            self.act = c.hidden_act
            self.per_layer_input_gate = Linear(h, self.ple_dim, use_bias=False, dtype=dtype, rngs=rngs)
            self.per_layer_projection = Linear(self.ple_dim, h, use_bias=False, dtype=dtype, rngs=rngs)
            self.post_per_layer_input_norm = _norm(h, c, dtype)
        else:
            self.per_layer_input_gate = self.per_layer_projection = self.post_per_layer_input_norm = None
        # A persistent buffer in transformers (stored in checkpoints); a Param here so the loaders fill it.
        self.layer_scalar = nnx.Param(jnp.ones((1,), dtype))

    def __call__(self, x, *, cos, sin, mask, shared_kv: dict, per_layer_input=None, token_mask=None):
        residual = x
        h = self.self_attn(
            self.input_layernorm(x), cos=cos, sin=sin, mask=mask, shared_kv=shared_kv, token_mask=token_mask
        )
        x = residual + self.post_attention_layernorm(h)
        residual = x
        h = self.mlp(self.pre_feedforward_layernorm(x), token_mask=token_mask)
        if self.enable_moe:
            h1 = self.post_feedforward_layernorm_1(h)
            shape = residual.shape
            flat = residual.reshape(-1, shape[-1])
            tm = None if token_mask is None else token_mask.reshape(-1)
            weights, index = self.router(flat, tm)
            h2 = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index, token_mask=tm)
            h2 = self.post_feedforward_layernorm_2(h2.reshape(shape))
            h = h1 + h2
        x = residual + self.post_feedforward_layernorm(h)
        if self.ple_dim:
            residual = x
            g = ACTIVATIONS[self.act](self.per_layer_input_gate(x, token_mask=token_mask))
            g = self.per_layer_projection(g * per_layer_input.astype(g.dtype), token_mask=token_mask)
            x = residual + self.post_per_layer_input_norm(g)
        return x * self.layer_scalar[...].astype(x.dtype)


class Gemma4TextModel(StagedTextModel):
    """``Gemma4TextModel``: scaled embeddings (+ PLE), layers with shared KV, final norm."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.config = c
        self.dtype = dtype
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, scale=c.embed_scale, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Gemma4DecoderLayer(c, i, dtype=dtype, rngs=rngs) for i in range(c.num_hidden_layers)])
        self.norm = _norm(c.hidden_size, c, dtype)
        self.ple_dim = int(c.extra("hidden_size_per_layer_input") or 0)
        if self.ple_dim:
            n, p = c.num_hidden_layers, self.ple_dim
            self.embed_tokens_per_layer = Embedding(
                c.extra("vocab_size_per_layer_input"), n * p, scale=math.sqrt(p), dtype=dtype, rngs=rngs
            )
            self.per_layer_model_projection = Linear(c.hidden_size, n * p, use_bias=False, dtype=dtype, rngs=rngs)
            self.per_layer_projection_norm = _norm(p, c, dtype)
        else:
            self.embed_tokens_per_layer = self.per_layer_model_projection = self.per_layer_projection_norm = None

    def rope_tables(self, positions: jax.Array, seq_len: int) -> dict[tuple[str, int], tuple[jax.Array, jax.Array]]:
        """cos/sin per (layer type, head_dim) present in the model (from the config: the stages run the
        prologue on the model without its layers)."""
        c = self.config
        out = {}
        for i in range(c.num_hidden_layers):
            key = (c.layer_type(i), c.extra("layer_head_dims")[i])
            if key not in out:
                inv, scale = rope_inv_freq(
                    c.rope_for(key[0]), key[1], max_position_embeddings=c.max_position_embeddings, seq_len=seq_len
                )
                out[key] = rope_cos_sin(positions, inv, scale, self.dtype)
        return out

    def per_layer_inputs(self, input_ids: jax.Array, embeds: jax.Array, token_mask=None) -> jax.Array:
        """PLE ``[B, S, L, P]``: ``(norm(proj(embeds) * H^-0.5) + embed_per_layer(ids)) * 2^-0.5``."""
        c = self.config
        b, s = input_ids.shape
        n, p = c.num_hidden_layers, self.ple_dim
        tok = self.embed_tokens_per_layer(input_ids).reshape(b, s, n, p)
        proj = self.per_layer_model_projection(embeds, token_mask=token_mask)
        proj = _times(proj, c.hidden_size**-0.5)
        proj = self.per_layer_projection_norm(proj.reshape(b, s, n, p))
        return _times(proj + tok.astype(proj.dtype), 2.0**-0.5)

    # ------------------------------------------------------------------ stages (StagedTextModel)
    #: ``shared_kv``: the KV a "store" layer leaves for the "reuse" layers after it.
    carried_kwargs: tuple[str, ...] = ("shared_kv",)

    def prologue(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Scaled embeddings ``[B, S, hidden]`` and the batch's context: ``token_mask``, ``ropes`` per (layer type,
        head_dim), ``masks`` per layer type, ``ple`` (``[B, S, L, P]`` or None) and an empty ``shared_kv``."""
        c = self.config
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, b, s)
        token_mask = None if attention_mask is None else attention_mask.astype(bool)
        x = self.embed_tokens(input_ids)
        masks = {}
        for i in range(c.num_hidden_layers):
            lt = c.layer_type(i)
            if lt not in masks:
                masks[lt] = build_mask(attention_mask, b, s, c.layer_sliding_window(i))
        ctx = {
            "token_mask": token_mask,
            "ropes": self.rope_tables(position_ids, s),
            "masks": masks,
            "ple": self.per_layer_inputs(input_ids, x, token_mask) if self.ple_dim else None,
            "shared_kv": {},
        }
        return x, ctx

    def layer_kwargs(self, i: int, ctx: dict) -> dict:
        """The keyword arguments of ``self.layers[i](x, **kwargs)`` for a batch's ``ctx``."""
        c = self.config
        lt = c.layer_type(i)
        cos, sin = ctx["ropes"][(lt, c.extra("layer_head_dims")[i])]
        ple = ctx["ple"]
        return {"cos": cos, "sin": sin, "mask": ctx["masks"][lt], "shared_kv": ctx["shared_kv"],
                "per_layer_input": None if ple is None else ple[:, :, i, :], "token_mask": ctx["token_mask"]}


class Gemma4ForCausalLM(CausalLM):
    """``Gemma4ForCausalLM`` / the text part of ``Gemma4ForConditionalGeneration`` (``lm_head`` tied by default).

    Inherits the head, soft-capping, ``logits`` and ``nll`` of the shared ``CausalLM``; only the text model differs.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = config
        self.dtype = dtype
        self.model = Gemma4TextModel(config, dtype=dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)


__all__ = [
    "Gemma4Attention",
    "Gemma4DecoderLayer",
    "Gemma4ForCausalLM",
    "Gemma4RMSNorm",
    "Gemma4Router",
    "Gemma4TextModel",
    "gemma4_config_hook",
    "kv_sharing_modes",
]
