"""The shared decoder: ``CausalLM`` -> ``model`` (``embed_tokens``, ``layers``, ``norm``) + ``lm_head``.

One implementation serves Llama, Mistral, Qwen2, Qwen3 and Gemma 3; the differences are switches
of ``ModelConfig`` (see ``config.py``). The module tree mirrors transformers', so NNX paths are HF
tensor names (after the checkpoint's text prefix, see ``converters/names.py``).

Forward::

    logits = model(input_ids [B, S] int32, attention_mask [B, S] | None)   # -> [B, S, V] float32

Positions come from the mask (left padding: ``cumsum(mask) - 1``, clipped at 0, as HF's
``generate`` does); masks are causal + key padding (+ sliding window on sliding layers).
``hidden_states`` / ``nll`` avoid materialising ``[B, S, V]`` logits (262k vocabularies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.models.config import ModelConfig, import_object
from jaxquant.models.layers import (
    Attention,
    Embedding,
    Linear,
    RMSNorm,
    attention_mask as build_mask,
    rope_cos_sin,
    rope_inv_freq,
)


def positions_from_mask(attention_mask: jax.Array | None, batch: int, seq: int) -> jax.Array:
    """Position ids ``[B, S]``: ``cumsum(mask) - 1`` clipped at 0 (left padding), or ``arange``."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0).astype(jnp.int32)


class DecoderLayer(nnx.Module):
    """One block: ``input_layernorm``, ``self_attn``, (``post_attention_layernorm``), ``mlp``.

    Llama-style: ``h = x + attn(norm1(x)); out = h + mlp(post_attention_layernorm(h))``.
    Gemma (``sandwich_norms``): ``h = x + post_attention_layernorm(attn(input_layernorm(x)))``;
    ``out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``.
    The MLP class comes from ``config.mlp_class(config.mlp_kind(i))`` (dense or MoE).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        norm = dict(eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype)
        self.layer_type = c.layer_type(layer_idx)
        self.sandwich = c.sandwich_norms
        self.input_layernorm = RMSNorm(c.hidden_size, **norm)
        self.self_attn = Attention(c, layer_idx, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, **norm)
        if c.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, **norm)
        else:
            self.pre_feedforward_layernorm = None
            self.post_feedforward_layernorm = None
        self.mlp = c.mlp_class(c.mlp_kind(layer_idx))(c, layer_idx, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, cos, sin, mask, token_mask=None):
        h = self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, mask=mask, token_mask=token_mask)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            h = self.mlp(self.pre_feedforward_layernorm(x), token_mask=token_mask)
            return x + self.post_feedforward_layernorm(h)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), token_mask=token_mask)


class StagedTextModel(nnx.Module):
    """A text model as stages (the protocol ``calibration/stages.py`` runs layer by layer): a subclass defines
    ``prologue(ids, mask, positions) -> (x, ctx)``, ``layer_kwargs(i, ctx)`` and ``carried_kwargs`` (the keyword
    arguments a layer updates for later layers); it has ``layers`` and a final ``norm``."""

    carried_kwargs: tuple[str, ...] = ()

    def epilogue(self, x: jax.Array) -> jax.Array:
        """The final norm of the last layer's output."""
        return self.norm(x)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states ``[B, S, hidden]`` (model dtype): ``prologue``, every layer, ``epilogue``."""
        x, ctx = self.prologue(input_ids, attention_mask, position_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, **self.layer_kwargs(i, ctx))
        return self.epilogue(x)


class DecoderModel(StagedTextModel):
    """transformers' ``*Model`` / ``*TextModel``: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.config = c
        self.dtype = dtype
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, scale=c.embed_scale, dtype=dtype, rngs=rngs)
        layer_cls = import_object(c.layer_class)
        self.layers = nnx.List([layer_cls(c, i, dtype=dtype, rngs=rngs) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype)

    def rope_tables(self, positions: jax.Array, seq_len: int) -> dict[str, tuple[jax.Array, jax.Array]]:
        """cos/sin per layer type present in the model."""
        c = self.config
        out = {}
        for lt in sorted({c.layer_type(i) for i in range(c.num_hidden_layers)}):
            inv, scale = rope_inv_freq(
                c.rope_for(lt), c.head_dim, max_position_embeddings=c.max_position_embeddings, seq_len=seq_len
            )
            out[lt] = rope_cos_sin(positions, inv, scale, self.dtype)
        return out

    def masks(self, attention_mask, batch: int, seq: int) -> dict[str, jax.Array]:
        c = self.config
        out = {}
        for i in range(c.num_hidden_layers):
            lt = c.layer_type(i)
            if lt not in out:
                out[lt] = build_mask(attention_mask, batch, seq, c.layer_sliding_window(i))
        return out

    # ------------------------------------------------------------------ stages (StagedTextModel)
    def prologue(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Embeddings ``[B, S, hidden]`` and the batch's context every layer reads: ``token_mask`` ``[B, S]``
        bool or None, ``ropes`` (cos, sin per layer type), ``masks`` (per layer type)."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, b, s)
        ctx = {
            "token_mask": None if attention_mask is None else attention_mask.astype(bool),
            "ropes": self.rope_tables(position_ids, s),
            "masks": self.masks(attention_mask, b, s),
        }
        return self.embed_tokens(input_ids), ctx

    def layer_kwargs(self, i: int, ctx: dict) -> dict:
        """The keyword arguments of ``self.layers[i](x, **kwargs)`` for a batch's ``ctx``."""
        lt = self.layers[i].layer_type
        cos, sin = ctx["ropes"][lt]
        return {"cos": cos, "sin": sin, "mask": ctx["masks"][lt], "token_mask": ctx["token_mask"]}


class CausalLM(nnx.Module):
    """``*ForCausalLM`` (and the text part of ``*ForConditionalGeneration``).

    ``lm_head`` is a ``Linear`` (with quantizers) when the embeddings are untied, else ``None`` and
    the head is ``model.embed_tokens.attend``.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = config
        self.dtype = dtype
        self.model = DecoderModel(config, dtype=dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)

    # ------------------------------------------------------------------ forward variants
    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        return self.model(input_ids, attention_mask, position_ids)

    def logits(self, hidden: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """Head + final soft-capping; float32 ``[..., V]``."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(hidden, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(hidden, token_mask=token_mask, preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        token_mask = None if attention_mask is None else attention_mask.astype(bool)
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids), token_mask)

    def nll(self, input_ids, attention_mask=None, *, chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
        """Next-token negative log-likelihood, summed: ``(sum_nll, n_tokens)`` (float32, int32).

        Targets are ``input_ids[:, 1:]``; a pair counts when both tokens are unmasked. The head is
        applied ``chunk`` tokens at a time so ``[B, S, V]`` logits never exist at once.
        """
        return self.nll_of_hidden(self.hidden_states(input_ids, attention_mask), input_ids, attention_mask,
                                  chunk=chunk)

    def nll_of_hidden(self, hidden, input_ids, attention_mask=None, *, chunk: int = 1024):
        """``nll`` from the final-normed hidden states ``[B, S, hidden]`` (the head and the loss only)."""
        b, s = input_ids.shape
        h = hidden[:, :-1]
        tgt = input_ids[:, 1:]
        if attention_mask is None:
            valid = jnp.ones((b, s - 1), bool)
        else:
            am = attention_mask.astype(bool)
            valid = am[:, 1:] & am[:, :-1]
        n = b * (s - 1)
        hd = h.reshape(n, -1)
        tg = tgt.reshape(n)
        va = valid.reshape(n)
        chunk = min(chunk, n)
        pad = (-n) % chunk
        if pad:
            hd = jnp.concatenate([hd, jnp.zeros((pad, hd.shape[-1]), hd.dtype)])
            tg = jnp.concatenate([tg, jnp.zeros((pad,), tg.dtype)])
            va = jnp.concatenate([va, jnp.zeros((pad,), bool)])
        k = (n + pad) // chunk

        def one(args):
            hc, tc, vc = args
            lg = self.logits(hc)
            lse = jax.nn.logsumexp(lg, axis=-1)
            tl = jnp.take_along_axis(lg, tc[:, None].astype(jnp.int32), axis=-1)[:, 0]
            return jnp.sum(jnp.where(vc, lse - tl, 0.0))

        if k == 1:
            total = one((hd, tg, va))
        else:
            total = jnp.sum(jax.lax.map(one, (hd.reshape(k, chunk, -1), tg.reshape(k, chunk), va.reshape(k, chunk))))
        return total, jnp.sum(valid).astype(jnp.int32)


def build_model(config: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Instantiate ``config.model_class`` (random init with ``rngs``, zeros without)."""
    cls = import_object(config.model_class)
    return cls(config, dtype=dtype, rngs=rngs)


def abstract_model(config: ModelConfig, *, dtype=jnp.bfloat16) -> nnx.Module:
    """The model with ``ShapeDtypeStruct`` leaves (no memory), for loaders."""
    return nnx.eval_shape(lambda: build_model(config, dtype=dtype, rngs=None))  # zeros: cheap to trace
