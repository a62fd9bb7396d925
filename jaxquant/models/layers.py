"""Flax NNX building blocks of the decoders, laid out like transformers' modules.

Attribute names equal the HF ones, so an NNX path (``model.layers.0.self_attn.q_proj.weight``) is
the HF tensor name and a quantizer path (``...q_proj.input_quantizer``) is ModelOpt's quantizer
name. Linear weights keep the HF layout ``[out, in]`` (blocks of NVFP4 run along the input
features, and export is a plain copy); the product is ``x @ W.T`` through ``lax.dot_general``.

Quantizer sites (``TensorQuantizer``; disabled ones return their input and cost nothing):

* ``Linear``: ``input_quantizer`` (activations), ``weight_quantizer``, ``output_quantizer``.
* ``Attention``: ``q_bmm_quantizer`` / ``k_bmm_quantizer`` / ``v_bmm_quantizer`` on the post-RoPE
  query, key and value, shaped ``[B, S, heads, head_dim]``.
* ``Embedding``: ``weight_quantizer`` on the token table (not on Gemma's scaled embeddings).

Every activation quantizer gets ``token_mask`` (``[B, S]`` bool, False on padding) so calibration
ignores pads.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.errors import UnsupportedError
from jaxquant.models.config import FULL, ModelConfig, RopeConfig
from jaxquant.quantizer import TensorQuantizer

def _in_float32(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``fn`` evaluated in float32 and rounded once to the input's dtype, as torch's activation kernels do for
    bf16/fp16 tensors (CPU and CUDA compute in float32 internally). Applied to a bf16 array, jax's ``gelu`` /
    ``silu`` would round after every elementwise op and, for tanh-GELU, use its constants rounded to bf16
    (sqrt(2/pi) -> 0.796875, 0.044715 -> 0.04468): a systematic bias that grows through the layers. A float32
    or wider input is computed as before."""

    def act(x: jax.Array) -> jax.Array:
        if jnp.finfo(x.dtype).bits >= 32:
            return fn(x)
        return fn(x.astype(jnp.float32)).astype(x.dtype)

    return act


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": _in_float32(jax.nn.silu),
    "swish": _in_float32(jax.nn.silu),
    "gelu": _in_float32(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_pytorch_tanh": _in_float32(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_new": _in_float32(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_fast": _in_float32(lambda x: jax.nn.gelu(x, approximate=True)),
    "relu": jax.nn.relu,
}

_INIT_STD = 0.02


def _normal(rngs: nnx.Rngs | None, shape, dtype):
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


# --------------------------------------------------------------------------------------- Linear
class Linear(nnx.Module):
    """``nn.Linear`` with ModelOpt's three quantizers; ``weight`` is ``[out, in]`` like torch.

    ``y = output_quantizer(input_quantizer(x) @ weight_quantizer(weight).T + bias)`` (ModelOpt's
    QuantLinear order: the bias is part of the linear, the output quantizer sees the sum), plus SVDQuant's
    low-rank branch of the pre-scaled input when the weight quantizer holds factors (``quantizer/lowrank.py``).

    Args:
      dot_general: injectable contraction (like ``nnx.Linear``), called as
        ``dot_general(x, w, dimension_numbers, precision=..., preferred_element_type=...)``.
    """

    modelopt_class = "nn.Linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype=jnp.float32,
        dot_general: Callable = jax.lax.dot_general,
        precision=None,
        rngs: nnx.Rngs | None = None,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
        self.dot_general = dot_general
        self.precision = precision
        self.input_quantizer = TensorQuantizer()
        self.weight_quantizer = TensorQuantizer()
        self.output_quantizer = TensorQuantizer()

    def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None, preferred_element_type=None):
        calib = self.input_quantizer.calibrator
        if calib is not None and self.input_quantizer.mode == "calibrate" and hasattr(calib, "linear_call"):
            return calib.linear_call(self, x, token_mask)  # an algorithm that searches on the linear (AWQ)
        lora = None  # SVDQuant's low-rank branch, on the pre-scaled input
        if self.weight_quantizer.svdquant_lora_a is not None:
            lora = self.weight_quantizer.lowrank_branch(self.input_quantizer.scaled(x), self.precision)
        x = self.input_quantizer(x, token_mask=token_mask)
        w = self.weight_quantizer(self.weight[...])
        y = self.output_quantizer(self.matmul(x, w, preferred_element_type), token_mask=token_mask)
        return y if lora is None else y + lora.astype(y.dtype)

    def matmul(self, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
        """``x @ w.T + bias`` with this linear's contraction (``w`` in ``[out, in]``), no quantizer."""
        if x.dtype != w.dtype:
            x = x.astype(w.dtype)
        y = self.dot_general(
            x,
            w,
            (((x.ndim - 1,), (1,)), ((), ())),
            precision=self.precision,
            preferred_element_type=preferred_element_type,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embedding(nnx.Module):
    """``nn.Embedding``: ``weight [vocab, hidden]``; optional Gemma scale sqrt(hidden).

    An unscaled embedding holds ModelOpt's ``weight_quantizer`` (``QuantEmbedding``): when a recipe enables it
    (ModelOpt's ``nvfp4_fp8_mha`` preset has no ``nn.Embedding`` exclusion), the lookup reads the fake-quantized
    table, its amax is the max over the table, and export writes the table like a weight-only linear's
    (``W4A16_NVFP4`` for NVFP4). ModelOpt's embedding ``input_quantizer`` (token ids) is hard-disabled, so there is
    none here; its ``output_quantizer`` is not implemented (``recipe.apply`` warns when a recipe enables it).
    Gemma's scaled embeddings get no quantizer: ModelOpt's registry does not convert that ``nn.Embedding``
    subclass.
    """

    modelopt_class = "nn.Embedding"

    def __init__(self, num_embeddings: int, features: int, *, scale: float | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.num_embeddings = num_embeddings
        self.features = features
        self.scale = scale
        self.weight = nnx.Param(_normal(rngs, (num_embeddings, features), dtype))
        self.weight_quantizer = TensorQuantizer() if scale is None else None

    def table(self) -> jax.Array:
        """The ``[vocab, hidden]`` table the lookup reads: the weight, fake-quantized when the weight quantizer is
        on (ModelOpt quantizes the whole table, then looks up)."""
        w = self.weight[...]
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def __call__(self, ids: jax.Array) -> jax.Array:
        w = self.table()
        x = jnp.take(w, ids, axis=0)
        if self.scale is not None:
            # transformers: embed * torch.tensor(sqrt(hidden)).to(weight.dtype)
            x = x * jnp.asarray(np.float32(self.scale), jnp.float32).astype(w.dtype)
        return x

    def attend(self, x: jax.Array, *, preferred_element_type=None) -> jax.Array:
        """Tied output head: ``x @ weight.T`` (unquantized: a quantized tied table is refused by ``apply_recipe``)."""
        if self.weight_quantizer is not None and self.weight_quantizer.enabled:
            raise UnsupportedError("a tied output head over a quantized embedding table is not supported (ModelOpt "
                                   "quantizes lm_head with a quantizer of its own); disable the embedding's "
                                   "weight_quantizer")
        w = self.weight[...]
        return jax.lax.dot_general(
            x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=preferred_element_type
        )


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis.

    ``offset=0`` (Llama): ``w * (x * rsqrt(mean(x^2) + eps)).astype(x.dtype)``, weight init 1.
    ``offset=1`` (Gemma): ``(x * rsqrt(...) * (1 + w))`` computed in float32, then cast; weight init 0.
    ``with_scale=False``: no weight at all (plain normalisation).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, offset: float = 0.0, with_scale: bool = True,
                 dtype=jnp.float32):
        self.dim = dim
        self.eps = eps
        self.offset = offset
        init = jnp.zeros((dim,), dtype) if offset else jnp.ones((dim,), dtype)
        self.weight = nnx.Param(init) if with_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.weight is None:
            return h.astype(dtype)
        w = self.weight[...]
        if self.offset:
            return (h * (self.offset + w.astype(jnp.float32))).astype(dtype)
        return w * h.astype(dtype)


# --------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(rope: RopeConfig, head_dim: int, *, max_position_embeddings: int,
                  seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float32, ``[head_dim * partial / 2]``) and the cos/sin scaling factor.

    Follows ``transformers.modeling_rope_utils`` in float32 arithmetic. ``seq_len`` only matters for
    ``dynamic`` (NTK) scaling, which grows the base once the sequence exceeds
    ``max_position_embeddings``.
    """
    f32 = np.float32
    dim = int(head_dim * rope.partial_rotary_factor)
    base = rope.theta
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    attention = 1.0
    t = rope.rope_type
    if t == "default":
        inv = f32(1.0) / (f32(base) ** exps)
    elif t == "linear":
        inv = (f32(1.0) / (f32(base) ** exps)) / f32(rope.factor)
    elif t == "dynamic":
        if seq_len is not None and seq_len > max_position_embeddings:
            factor = rope.factor
            base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        inv = f32(1.0) / (f32(base) ** exps)
    elif t == "llama3":
        inv = f32(1.0) / (f32(base) ** exps)
        factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old = rope.original_max_position_embeddings
        low_wl, high_wl = old / lo, old / hi
        wavelen = f32(2 * math.pi) / inv
        inv_l = np.where(wavelen > low_wl, inv / f32(factor), inv)
        smooth = (f32(old) / wavelen - f32(lo)) / f32(hi - lo)
        smoothed = (f32(1) - smooth) * inv_l / f32(factor) + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l)
    elif t == "yarn":
        factor = rope.factor
        omp = rope.original_max_position_embeddings
        if factor is None:
            factor = max_position_embeddings / omp

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = rope.attention_factor
        if attention is None:
            if rope.mscale and rope.mscale_all_dim:
                attention = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
            else:
                attention = mscale(factor)
        beta_fast = rope.beta_fast or 32
        beta_slow = rope.beta_slow or 1

        def corr_dim(n_rot):
            return (dim * math.log(omp / (n_rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
        pos_freqs = f32(base) ** exps
        extra = f32(1.0) / pos_freqs
        inter = f32(1.0) / (f32(factor) * pos_freqs)
        extra_factor = f32(1) - ramp
        inv = inter * (f32(1) - extra_factor) + extra * extra_factor
    elif t == "proportional":
        angles = int(rope.partial_rotary_factor * head_dim // 2)
        e = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(f32) / f32(head_dim)
        inv = f32(1.0) / (f32(base) ** e)
        nope = head_dim // 2 - angles
        if nope > 0:
            inv = np.concatenate([inv, np.zeros(nope, f32)])
        inv = inv / f32(rope.factor or 1.0)
    else:  # validated in config
        raise ValueError(t)
    return np.asarray(inv, f32), float(attention)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scaling: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, S, 2 * len(inv_freq)]`` for integer ``positions [B, S]`` (HF's concatenated halves)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb) * scaling
    sin = jnp.sin(emb) * scaling
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, S, H, D]`` with ``cos/sin [B, S, D]`` (rotate-half convention, as HF)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------- attention
def attention_mask(attention_mask: jax.Array | None, batch: int, seq: int,
                   sliding_window: int | None = None) -> jax.Array:
    """Boolean ``[B, 1, S, S]`` mask: causal, key padding, and ``q - k < sliding_window``."""
    q = jnp.arange(seq)[:, None]
    k = jnp.arange(seq)[None, :]
    m = k <= q
    if sliding_window is not None:
        m = m & (q - k < sliding_window)
    m = jnp.broadcast_to(m[None, None], (batch, 1, seq, seq))
    if attention_mask is not None:
        m = m & attention_mask.astype(bool)[:, None, None, :]
    return m


def dot_product_attention(q, k, v, mask, *, scaling: float, softcap: float | None = None, probs_quantizer=None):
    """Grouped-query attention like transformers' eager path.

    Args:
      q: ``[B, S, Hq, D]``; k, v: ``[B, T, Hkv, D]``; mask: bool broadcastable to ``[B, 1, S, T]``.
      probs_quantizer: the attention's ``p_bmm_quantizer`` (or None). When it fake-quantizes, the probabilities
        are quantized as ModelOpt's flash-attention kernel does: ``p = exp(scores - row max)`` (unnormalised, in
        [0, 1]) goes through the quantizer, the row sum stays that of the unquantized ``p``, and the output is
        ``(quantized p @ v) / row sum``. ModelOpt's kernel does this per key tile against a running max, so its
        rounding depends on the tile size; here the row's final max is used (one tile spanning the row). Off, or
        calibrating, the plain softmax runs (ModelOpt's calibration never quantizes P either).
    Returns:
      ``[B, S, Hq, D]`` in q's dtype. Scores are computed in the input dtype, softmax in float32.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, s, hkv, g, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k) * jnp.asarray(scaling, q.dtype)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = scores.astype(jnp.float32)
    m = mask[:, :, None] if mask.ndim == 4 else mask  # [B, 1, 1, S, T]
    scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    if probs_quantizer is not None and probs_quantizer.enabled and probs_quantizer.mode == "fake_quant":
        p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        row_sum = jnp.sum(p, axis=-1)  # [B, Hkv, G, S]
        pq = probs_quantizer(p).astype(v.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", pq, v).astype(jnp.float32)
        out = out / jnp.moveaxis(row_sum, -1, 1)[..., None]
        return out.astype(v.dtype).reshape(b, s, hq, d)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, hq, d)


class Attention(nnx.Module):
    """Self-attention of one decoder layer (``self_attn``): GQA, optional q/k norm, RoPE, masks.

    Quantizer sites: the four projections' linear quantizers, ``q_bmm_quantizer`` / ``k_bmm_quantizer`` /
    ``v_bmm_quantizer`` on the post-RoPE q, k, v ``[B, S, heads, head_dim]``, and ``p_bmm_quantizer`` on the
    softmax probabilities (``dot_product_attention``).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.layer_type = c.layer_type(layer_idx)
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.scaling = c.scaling
        self.sliding_window = c.layer_sliding_window(layer_idx)
        self.softcap = c.attn_logit_softcapping
        hd = self.head_dim
        self.q_proj = Linear(c.hidden_size, self.num_heads * hd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, self.num_kv_heads * hd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, self.num_kv_heads * hd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.num_heads * hd, c.hidden_size, use_bias=c.o_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype)
            self.k_norm = RMSNorm(hd, eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype)
        else:
            self.q_norm = None
            self.k_norm = None
        self.q_bmm_quantizer = TensorQuantizer()
        self.k_bmm_quantizer = TensorQuantizer()
        self.v_bmm_quantizer = TensorQuantizer()
        self.p_bmm_quantizer = TensorQuantizer()

    def constant_amax_of(self, attr: str) -> float | None:
        """The amax of a quantizer calibration never sets (``recipe.apply``): 1.0 for ``p_bmm_quantizer``, the
        bound of the unnormalised probabilities and ModelOpt's kernel default (ModelOpt never calibrates P)."""
        return 1.0 if attr == "p_bmm_quantizer" else None

    def bmm_tensor_shape(self, attr: str) -> tuple[int, ...] | None:
        """``[1, 1, heads, head_dim]`` of the tensor a bmm quantizer sees (batch and sequence unknown: 1), for the
        per-head bias of affine KV quantizers (``recipe.apply`` passes it to those only); None for other
        attributes."""
        heads = {"q_bmm_quantizer": self.num_heads, "k_bmm_quantizer": self.num_kv_heads,
                 "v_bmm_quantizer": self.num_kv_heads}.get(attr)
        return None if heads is None else (1, 1, heads, self.head_dim)

    def __call__(self, x, *, cos, sin, mask, token_mask=None):
        b, s, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x, token_mask=token_mask).reshape(b, s, self.num_heads, hd)
        k = self.k_proj(x, token_mask=token_mask).reshape(b, s, self.num_kv_heads, hd)
        v = self.v_proj(x, token_mask=token_mask).reshape(b, s, self.num_kv_heads, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = self.q_bmm_quantizer(q, token_mask=token_mask)
        k = self.k_bmm_quantizer(k, token_mask=token_mask)
        v = self.v_bmm_quantizer(v, token_mask=token_mask)
        out = dot_product_attention(q, k, v, mask, scaling=self.scaling, softcap=self.softcap,
                                    probs_quantizer=self.p_bmm_quantizer)
        return self.o_proj(out.reshape(b, s, self.num_heads * hd), token_mask=token_mask)


# --------------------------------------------------------------------------------------- MLP
class MLP(nnx.Module):
    """Gated MLP (``mlp``): ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 intermediate_size: int | None = None):
        c = config
        inter = intermediate_size or c.intermediate_size
        self.act = c.hidden_act
        self.gate_proj = Linear(c.hidden_size, inter, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, inter, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(inter, c.hidden_size, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, token_mask=None):
        act = ACTIVATIONS[self.act]
        h = act(self.gate_proj(x, token_mask=token_mask)) * self.up_proj(x, token_mask=token_mask)
        return self.down_proj(h, token_mask=token_mask)


__all__ = [
    "ACTIVATIONS",
    "Attention",
    "Embedding",
    "FULL",
    "Linear",
    "MLP",
    "RMSNorm",
    "apply_rope",
    "attention_mask",
    "dot_product_attention",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_half",
]
