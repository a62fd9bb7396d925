"""Sparse mixture-of-experts blocks (Mixtral, Qwen3-MoE, Gemma 4) with per-expert quantizers.

Facts this module implements (transformers 5.x, read from ``models/{mixtral,qwen3_moe,gemma4}``; details
and sources in docs/moe.md):

* Routing: ``probs = softmax(float32(router_logits))``, ``top_k`` of the probabilities, then
  * Mixtral: always renormalised over the top-k (``w / sum(w)``), weights stay float32;
  * Qwen3-MoE: renormalised only if ``norm_topk_prob``; weights cast back to the logits' dtype;
  * Gemma 4: renormalised, then multiplied by the learned ``per_expert_scale[index]``.
* Expert ``e`` computes ``down_e(act(gate_e(x)) * up_e(x))`` and the block returns
  ``sum_k w_k * expert_{idx_k}(x)``.
* Weights are stored stacked per expert in HF's per-expert ``[out, in]`` orientation:
  ``gate_proj`` and ``up_proj`` ``[E, I, H]`` (HF v5 stores them fused as ``gate_up_proj [E, 2I, H]``,
  gate first), ``down_proj`` ``[E, H, I]``.

Quantizers: every projection has its own ``TensorQuantizer(instances=E)`` for input, weight and output
(``gate_proj_input_quantizer``, ``gate_proj_weight_quantizer``, ...), so gate and up keep separate amax
(ModelOpt unifies them at export for NVFP4). Their ModelOpt names come from :meth:`MoeExperts.quantizer_names`
(``{e}.gate_proj.weight_quantizer`` for Qwen3-MoE / Gemma 4, ``{e}.w1.weight_quantizer`` for Mixtral, relative
to the experts module).

Calibration semantics: an expert's input quantizer sees the ``[E, T, H]`` broadcast of the tokens with
``token_mask[e, t] = routed(t -> e) & not_padding(t)``, so its amax is the max |x| over the real tokens routed to
that expert (ModelOpt's sequential-experts semantics before ``layer_sync_moe_local_experts_amax``). The
down-projection input quantizer likewise only sees the routed tokens' intermediate activations. (The grouped
path computes the same statistic from the expert-sorted rows.)

Compute (``MoeExperts(impl=...)``, same outputs and statistics either way): ``"grouped"`` (default) sorts the
``N * k`` (token, expert) pairs by expert and runs one ``jax.lax.ragged_dot`` per projection (top-k FLOPs);
``"dense"`` runs every expert on every token and combines with the (mostly zero) routing weights — exact, but
``E / top_k`` times the FLOPs and ``E * T * I`` activation memory. Grouped falls back to dense while an activation
quantizer uses a format without a per-row kernel (per-channel, static blocks).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.errors import UnsupportedError
from jaxquant.quantizer.tensor_quantizer import TensorQuantizer

# ----------------------------------------------------------------------------------------------- activations


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function HF calls ``name`` (``hidden_act`` / ``hidden_activation``)."""
    from jaxquant.models.layers import ACTIVATIONS

    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------------------- routing


def route_topk(
    logits: jax.Array,
    top_k: int,
    *,
    renormalize: bool,
    weights_dtype=jnp.float32,
    per_expert_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Transformers' top-k router: softmax in float32, top-k, optional renormalisation.

    Args:
      logits: ``[N, E]`` router logits (any float dtype).
      top_k: experts per token.
      renormalize: divide the top-k probabilities by their sum (Mixtral always; Qwen3-MoE iff
        ``norm_topk_prob``; Gemma 4 always).
      weights_dtype: dtype of the returned weights (float32 for Mixtral and Gemma 4, the logits' dtype for
        Qwen3-MoE).
      per_expert_scale: optional ``[E]`` multiplier applied after renormalisation (Gemma 4).

    Returns:
      ``(weights [N, k], index [N, k] int32)``.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, index = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if per_expert_scale is not None:
        weights = weights * per_expert_scale.astype(jnp.float32)[index]
    return weights.astype(weights_dtype), index.astype(jnp.int32)


def dense_routing(weights: jax.Array, index: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Scatter top-k routing into dense ``[N, E]`` combine weights and a boolean ``[N, E]`` routed mask."""
    onehot = jax.nn.one_hot(index, num_experts, dtype=weights.dtype)  # [N, k, E]
    combine = jnp.einsum("nk,nke->ne", weights, onehot)
    routed = jnp.any(index[..., None] == jnp.arange(num_experts, dtype=index.dtype), axis=1)
    return combine, routed


# ----------------------------------------------------------------------------------------------- experts

#: ModelOpt's per-expert linear names (``get_expert_linear_names``), in (gate, up, down) order.
EXPERT_NAMES_QWEN = ("gate_proj", "up_proj", "down_proj")  # Qwen2/3-MoE, DeepSeek, Gemma 4
EXPERT_NAMES_MIXTRAL = ("w1", "w3", "w2")  # Mixtral: w1 = gate, w3 = up, w2 = down

_PROJ = ("gate_proj", "up_proj", "down_proj")
_ROLES = ("input_quantizer", "weight_quantizer", "output_quantizer")


def _is_active(q: TensorQuantizer) -> bool:
    return q.enabled and q.mode != "off"


def _row_quantizable(q: TensorQuantizer) -> bool:
    """Whether ``_quantize_rows`` can apply ``q`` to expert-sorted rows (inactive, or a per-tensor format)."""
    from jaxquant.formats.registry import quantizer_format

    return not _is_active(q) or quantizer_format(q.config.format).per_tensor_amax


def _quantize_rows(q: TensorQuantizer, x: jax.Array, rows_e: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Apply a stacked (``instances=E``) per-tensor quantizer to rows ``x [M, D]`` whose expert is ``rows_e [M]``.

    Same semantics as ``q`` on the ``[E, T, D]`` broadcast with ``token_mask[e, t] = routed & valid``: calibration
    keeps, per expert, the running max |x| over its valid rows; fake quant uses each row's expert amax.
    """
    if not _is_active(q):
        return x
    from jaxquant.quantizer.tensor_quantizer import fake_quant_ste

    e = q.instances
    if q.mode == "calibrate":
        if q.config.needs_calibration:
            a = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
            if valid is not None:
                a = jnp.where(valid, a, 0.0)
            per_e = jnp.maximum(jax.ops.segment_max(a, rows_e, num_segments=e, indices_are_sorted=True), 0.0)
            q.amax.value = jnp.maximum(q.amax.value, per_e.reshape(q.amax.value.shape))
        return x
    amax_rows = q.amax.value.reshape(e)[rows_e][:, None]
    return fake_quant_ste(q.config.format, q.block_size, x, amax_rows, None)


class MoeExperts(nnx.Module):
    """``E`` gated-MLP experts stored stacked, with per-expert (``instances=E``) quantizers.

    Params (HF per-expert ``[out, in]`` orientation): ``gate_proj [E, I, H]``, ``up_proj [E, I, H]``,
    ``down_proj [E, H, I]``.

    Quantizer attributes: ``{gate,up,down}_proj_{input,weight,output}_quantizer``. Their ModelOpt names
    (relative to this module) are ``{e}.{name}.{role}`` with ``name`` from ``expert_names`` — see
    :meth:`quantizer_names`.
    """

    #: ModelOpt class of the immediate parent of each per-expert quantizer (sequential experts are nn.Linear).
    modelopt_class = "nn.Linear"

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        act: str = "silu",
        expert_names: Sequence[str] = EXPERT_NAMES_QWEN,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        impl: str = "grouped",
    ):
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts = E
        self.hidden_size = H
        self.intermediate_size = I
        self.act_name = act
        self.expert_names = tuple(expert_names)
        self.impl = impl
        if len(self.expert_names) != 3:
            raise ValueError("expert_names must be (gate, up, down) names")
        init = nnx.initializers.normal(init_std)
        self.gate_proj = nnx.Param(init(rngs.params(), (E, I, H), dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (E, I, H), dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (E, H, I), dtype))
        for p in _PROJ:
            for r in _ROLES:
                setattr(self, f"{p}_{r}", TensorQuantizer(instances=E))

    # ------------------------------------------------------------------ quantizer naming protocol
    def _split_attr(self, attr_name: str) -> tuple[str, str]:
        for p in _PROJ:
            if attr_name.startswith(p + "_"):
                role = attr_name[len(p) + 1 :]
                if role in _ROLES:
                    return p, role
        raise KeyError(f"{type(self).__name__} has no quantizer attribute {attr_name!r}")

    def quantizer_names(self, attr_name: str) -> list[str]:
        """ModelOpt names of the ``E`` instances of quantizer ``attr_name``, relative to this module."""
        proj, role = self._split_attr(attr_name)
        name = self.expert_names[_PROJ.index(proj)]
        return [f"{e}.{name}.{role}" for e in range(self.num_experts)]

    def quantizer_tensor_shape(self, attr_name: str) -> tuple[int, ...]:
        """Shape of the stacked tensor quantizer ``attr_name`` sees (one token for activations)."""
        proj, role = self._split_attr(attr_name)
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        if role == "weight_quantizer":
            return (E, H, I) if proj == "down_proj" else (E, I, H)
        if role == "input_quantizer":
            return (E, 1, I) if proj == "down_proj" else (E, 1, H)
        return (E, 1, H) if proj == "down_proj" else (E, 1, I)

    def weight_param_name(self, attr_name: str) -> str:
        """The attribute (``gate_proj`` / ``up_proj`` / ``down_proj``) a ``*_weight_quantizer`` quantizes."""
        proj, role = self._split_attr(attr_name)
        if role != "weight_quantizer":
            raise KeyError(f"{attr_name!r} is not a weight quantizer")
        return proj

    def weight_of(self, attr_name: str) -> nnx.Param:
        """The stacked weight a ``*_weight_quantizer`` attribute quantizes."""
        return getattr(self, self.weight_param_name(attr_name))

    def weight_quantizers(self):
        """``(attr_name, quantizer, stacked weight)`` for the three weight quantizers."""
        return [(f"{p}_weight_quantizer", getattr(self, f"{p}_weight_quantizer"), getattr(self, p)) for p in _PROJ]

    def calibrate_weights(self):
        """Max calibration of the weight quantizers from the weights themselves (no data)."""
        for _, q, w in self.weight_quantizers():
            q.calibrate_weight(w.value)

    # ------------------------------------------------------------------ forward
    def _project(self, proj: str, x: jax.Array, x_shared: bool, mask: jax.Array | None) -> jax.Array:
        """One stacked projection. ``x`` is ``[N, in]`` (shared by all experts) or ``[E, N, in]``."""
        qin = getattr(self, f"{proj}_input_quantizer")
        qw = getattr(self, f"{proj}_weight_quantizer")
        qout = getattr(self, f"{proj}_output_quantizer")
        w = getattr(self, proj).value
        if _is_active(qin):
            if x_shared:
                x = jnp.broadcast_to(x, (self.num_experts,) + x.shape)
                x_shared = False
            x = qin(x, token_mask=mask)
        w = qw(w)
        y = jnp.einsum("nh,eoh->eno" if x_shared else "enh,eoh->eno", x, w.astype(x.dtype))
        if _is_active(qout):
            y = qout(y, token_mask=mask)
        return y

    def __call__(
        self,
        x: jax.Array,
        weights: jax.Array,
        index: jax.Array,
        *,
        token_mask: jax.Array | None = None,
        impl: str | None = None,
    ) -> jax.Array:
        """Mixture output for flat tokens: ``sum_k weights[n, k] * expert_{index[n, k]}(x[n])``.

        Args:
          x: ``[N, H]`` expert inputs.
          weights: ``[N, k]`` routing weights (from ``route_topk``).
          index: ``[N, k]`` int expert indices.
          token_mask: ``[N]`` bool, False at padding (only affects calibration statistics).
          impl: ``"dense"`` (every expert on every token, combined with zero weights where not routed) or
            ``"grouped"`` (token copies sorted by expert, ``jax.lax.ragged_dot``: top-k FLOPs); default
            ``self.impl``. Both give the same outputs and calibration statistics; ``grouped`` falls back to
            ``dense`` while an activation quantizer uses a format without a per-token kernel (per-channel / static
            blocks).

        Returns:
          ``[N, H]`` in ``x``'s dtype.
        """
        impl = impl or self.impl
        if impl == "grouped" and all(_row_quantizable(getattr(self, f"{p}_{r}")) for p in _PROJ
                                     for r in ("input_quantizer", "output_quantizer")):
            return self._grouped(x, weights, index, token_mask)
        if impl not in ("dense", "grouped"):
            raise ValueError(f"impl must be 'dense' or 'grouped', not {impl!r}")
        combine, routed = dense_routing(weights, index, self.num_experts)
        mask = routed.T  # [E, N]
        if token_mask is not None:
            mask = mask & token_mask.astype(bool)[None, :]
        act = activation(self.act_name)
        g = self._project("gate_proj", x, True, mask)
        u = self._project("up_proj", x, True, mask)
        h = act(g) * u
        y = self._project("down_proj", h, False, mask)  # [E, N, H]
        out_dtype = jnp.promote_types(y.dtype, combine.dtype)
        out = jnp.einsum("enh,ne->nh", y.astype(out_dtype), combine.astype(out_dtype))
        return out.astype(x.dtype)

    def _grouped(self, x, weights, index, token_mask):
        """Sparse dispatch: the ``N * k`` (token, expert) pairs sorted by expert, one ``ragged_dot`` per projection."""
        n, k = index.shape
        flat_e = index.reshape(-1).astype(jnp.int32)
        order = jnp.argsort(flat_e, stable=True)
        tok = order // k  # token of each sorted row
        rows_e = flat_e[order]  # expert of each sorted row (non-decreasing)
        sizes = jnp.bincount(flat_e, length=self.num_experts).astype(jnp.int32)
        valid = None if token_mask is None else token_mask.astype(bool).reshape(-1)[tok]
        xs = x[tok]
        act = activation(self.act_name)

        def project(proj, h):
            h = _quantize_rows(getattr(self, f"{proj}_input_quantizer"), h, rows_e, valid)
            w = getattr(self, f"{proj}_weight_quantizer")(getattr(self, proj).value)
            y = jax.lax.ragged_dot(h, jnp.swapaxes(w, 1, 2).astype(h.dtype), sizes)
            return _quantize_rows(getattr(self, f"{proj}_output_quantizer"), y, rows_e, valid)

        h = act(project("gate_proj", xs)) * project("up_proj", xs)
        y = project("down_proj", h)  # [N * k, H]
        w_rows = weights.reshape(-1)[order]
        out_dtype = jnp.promote_types(y.dtype, w_rows.dtype)
        contrib = y.astype(out_dtype) * w_rows.astype(out_dtype)[:, None]
        out = jnp.zeros((n, y.shape[-1]), out_dtype).at[tok].add(contrib)
        return out.astype(x.dtype)

    # ------------------------------------------------------------------ loading helpers
    def load_fused(self, gate_up_proj, down_proj):
        """Set weights from HF v5 fused tensors ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
        gate, up = split_gate_up(gate_up_proj)
        self.gate_proj.value = jnp.asarray(gate, self.gate_proj.value.dtype)
        self.up_proj.value = jnp.asarray(up, self.up_proj.value.dtype)
        self.down_proj.value = jnp.asarray(down_proj, self.down_proj.value.dtype)


def split_gate_up(gate_up):
    """Split HF v5 ``gate_up_proj [E, 2I, H]`` into ``(gate [E, I, H], up [E, I, H])`` (gate first)."""
    two_i = gate_up.shape[1]
    if two_i % 2:
        raise ValueError(f"gate_up_proj has an odd middle dimension {gate_up.shape}")
    return gate_up[:, : two_i // 2], gate_up[:, two_i // 2 :]


# ----------------------------------------------------------------------------------------------- blocks


class SparseMoeBlock(nnx.Module):
    """Mixtral / Qwen3-MoE sparse block: router ``gate`` (a quantizer-bearing ``Linear`` H -> E) + ``experts``.

    Sits at ``mlp`` (Qwen3-MoE) or ``block_sparse_moe`` (Mixtral) of a decoder layer; built from
    ``ModelConfig`` (``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``).
    The router's quantizers exist so that recipes' router exclusions (``*mlp.gate.*``,
    ``*block_sparse_moe.gate*``) match as in ModelOpt, but no recipe enables them (``modelopt_quantizers = False``):
    transformers 5's routers (``Qwen3MoeTopKRouter``, ``MixtralTopKRouter``) are not ``nn.Linear``, so ModelOpt gives
    them no quantizer and leaves them unquantized whatever the recipe says.
    """

    def __init__(self, config, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        from jaxquant.models.layers import Linear

        c = config
        if c.num_experts <= 0 or c.num_experts_per_tok <= 0:
            raise UnsupportedError(f"{c.architecture}: layer {layer_idx} is sparse but the config has no experts.")
        mixtral = c.family == "mixtral"
        self.num_experts = c.num_experts
        self.top_k = c.num_experts_per_tok
        # Mixtral always renormalises and keeps float32 weights; Qwen3-MoE renormalises iff norm_topk_prob
        # and casts the weights to the logits' dtype.
        self.renormalize = True if mixtral else bool(c.norm_topk_prob)
        self.weights_in_logits_dtype = not mixtral
        self.gate = Linear(c.hidden_size, c.num_experts, use_bias=False, dtype=dtype, rngs=rngs)
        self.gate.modelopt_quantizers = False  # a TopKRouter in transformers 5: no ModelOpt quantizer (class doc)
        self.experts = MoeExperts(
            c.num_experts,
            c.hidden_size,
            c.moe_intermediate_size or c.intermediate_size,
            act=c.hidden_act,
            expert_names=EXPERT_NAMES_MIXTRAL if mixtral else EXPERT_NAMES_QWEN,
            dtype=dtype,
            rngs=rngs if rngs is not None else nnx.Rngs(0),
        )

    def route(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(weights [N, k], index [N, k])`` for flat tokens ``x [N, H]``."""
        logits = self.gate(x, token_mask=token_mask)
        return route_topk(
            logits,
            self.top_k,
            renormalize=self.renormalize,
            weights_dtype=logits.dtype if self.weights_in_logits_dtype else jnp.float32,
        )

    def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None) -> jax.Array:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        tm = None if token_mask is None else token_mask.reshape(-1)
        weights, index = self.route(xf, tm)
        return self.experts(xf, weights, index, token_mask=tm).reshape(shape)


def _mixtral_layer_base():
    from jaxquant.models.decoder import DecoderLayer

    return DecoderLayer


class MixtralDecoderLayer(_mixtral_layer_base()):
    """The shared decoder layer with its MLP stored at ``block_sparse_moe`` (hub / ModelOpt name).

    ``mlp`` stays an alias, so the shared forward is unchanged; only ``block_sparse_moe`` is in the NNX
    tree (quantizer names ``model.layers.L.block_sparse_moe.experts.{e}.w1.weight_quantizer``).
    """

    @property
    def mlp(self):
        return self.block_sparse_moe

    @mlp.setter
    def mlp(self, value):
        self.block_sparse_moe = value


# ----------------------------------------------------------------------------------------------- config hooks


def _num_experts(t) -> int:
    v = t.get("num_experts")
    if v is None:
        v = t.get("num_local_experts")
    return int(v or 0)


def mixtral_config_hook(t, fields):
    """``ModelConfig`` fields of ``MixtralForCausalLM`` (every layer sparse, experts of ``intermediate_size``)."""
    n = fields["num_hidden_layers"]
    fields.update(
        num_experts=_num_experts(t),
        num_experts_per_tok=int(t.get("num_experts_per_tok") or 2),
        moe_intermediate_size=int(t["intermediate_size"]),
        norm_topk_prob=True,
        mlp_kinds=("moe",) * n,
    )


def qwen3_moe_config_hook(t, fields):
    """``ModelConfig`` fields of ``Qwen3MoeForCausalLM``.

    Layer ``L`` is sparse iff ``L not in mlp_only_layers and num_experts > 0 and (L + 1) % decoder_sparse_step == 0``
    (else a dense MLP of ``intermediate_size``). ``sliding_window`` applies to every layer when
    ``use_sliding_window`` (``Qwen3MoeAttention`` has no ``max_window_layers``).
    """
    n = fields["num_hidden_layers"]
    e = _num_experts(t)
    step = int(t.get("decoder_sparse_step") or 1)
    only = set(t.get("mlp_only_layers") or [])
    kinds = tuple("moe" if (i not in only and e > 0 and (i + 1) % step == 0) else "dense" for i in range(n))
    fields.update(
        num_experts=e,
        num_experts_per_tok=int(t.get("num_experts_per_tok") or 8),
        moe_intermediate_size=int(t.get("moe_intermediate_size") or 768),
        norm_topk_prob=bool(t.get("norm_topk_prob", False)),
        mlp_kinds=kinds,
    )
    if t.get("use_sliding_window") and t.get("sliding_window") is not None:
        from jaxquant.models.config import SLIDING

        fields["layer_types"] = (SLIDING,) * n
        fields["sliding_window"] = int(t["sliding_window"])


# ----------------------------------------------------------------------------------------------- checkpoints
#
# jaxquant's NNX layout stores each expert projection stacked (``<P>.experts.gate_proj [E, I, H]``). Checkpoints
# carry either the transformers-5 fused tensors (``<P>.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
# or the hub's per-expert tensors (``<P>.experts.{e}.gate_proj.weight`` / Mixtral ``w1/w3/w2``); Mixtral's v5 names
# also say ``mlp`` where the hub and jaxquant say ``block_sparse_moe``. ``MoeTensorSource`` presents a checkpoint
# in the NNX layout to the loader; ``hf_expert_tensors`` is the reverse map for export.

_EXPERT_PARAM = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")
_CKPT_EXPERT = re.compile(
    r"\.experts\.(?:\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3)\.weight|gate_up_proj|down_proj)$"
)


def expert_names_for(config) -> tuple[str, str, str]:
    """ModelOpt / hub per-expert linear names of ``config``'s family, in (gate, up, down) order."""
    return EXPERT_NAMES_MIXTRAL if config.family == "mixtral" else EXPERT_NAMES_QWEN


def _mixtral_alternatives(name: str) -> list[str]:
    """Mixtral names under the hub's ``block_sparse_moe`` and transformers-5's ``mlp``."""
    out = [name]
    if ".block_sparse_moe." in name:
        out.append(name.replace(".block_sparse_moe.", ".mlp."))
    return out


class MoeTensorSource:
    """``TensorSource`` (see ``converters/hf.py``) that serves jaxquant's stacked expert params from a checkpoint.

    A requested ``<P>.experts.{gate,up,down}_proj`` is taken, in order, from the tensor of that very name (v5
    ``down_proj``), from the v5 fused ``<P>.experts.gate_up_proj`` (gate = first half of axis 1), or by stacking the
    per-expert ``<P>.experts.{e}.<name>.weight``. Everything else passes through (Mixtral also tries ``mlp`` for
    ``block_sparse_moe``).
    """

    def __init__(self, config, base):
        self.base = base
        self.num_experts = config.num_experts
        self.names = expert_names_for(config)
        self.mixtral = config.family == "mixtral"
        self._plans: dict[str, tuple] = {}

    def _plan(self, name: str):
        if name in self._plans:
            return self._plans[name]
        plan = None
        candidates = _mixtral_alternatives(name) if self.mixtral else [name]
        for cand in candidates:
            if self.base.has(cand):
                plan = ("direct", cand)
                break
            m = _EXPERT_PARAM.match(cand)
            if m is None:
                continue
            prefix, proj = m["prefix"], m["proj"]
            if proj in ("gate_proj", "up_proj") and self.base.has(prefix + ".gate_up_proj"):
                plan = ("half", prefix + ".gate_up_proj", 0 if proj == "gate_proj" else 1)
                break
            ename = self.names[_PROJ.index(proj)]
            parts = [f"{prefix}.{e}.{ename}.weight" for e in range(self.num_experts)]
            if self.num_experts and all(self.base.has(p) for p in parts):
                plan = ("stack", parts)
                break
        self._plans[name] = plan
        return plan

    def has(self, name):
        return self._plan(name) is not None

    def shape(self, name):
        plan = self._plan(name)
        if plan[0] == "direct":
            return tuple(self.base.shape(plan[1]))
        if plan[0] == "half":
            e, two_i, h = self.base.shape(plan[1])
            return (e, two_i // 2, h)
        shapes = {tuple(self.base.shape(p)) for p in plan[1]}
        if len(shapes) != 1:
            from jaxquant.errors import CheckpointError

            raise CheckpointError(f"{self.base.where(plan[1][0])}: experts of {name!r} have different shapes {shapes}")
        return (len(plan[1]),) + shapes.pop()

    def dtype(self, name):
        plan = self._plan(name)
        if plan[0] == "stack":
            tags = {self.base.dtype(p) for p in plan[1]}
            return tags.pop() if len(tags) == 1 else "mixed:" + ",".join(sorted(tags))
        return self.base.dtype(plan[1])

    def get(self, name):
        import numpy as np

        plan = self._plan(name)
        if plan[0] == "direct":
            return self.base.get(plan[1])
        if plan[0] == "half":
            gate, up = split_gate_up(self.base.get(plan[1]))
            return gate if plan[2] == 0 else up
        return np.stack([self.base.get(p) for p in plan[1]])

    def where(self, name):
        plan = self._plan(name)
        if plan is None:
            m = _EXPERT_PARAM.match(name)
            if m is None:
                return self.base.where(name)
            ename = self.names[_PROJ.index(m["proj"])]
            return (f"{self.base.where(name)} (experts are read from {m['prefix']}.gate_up_proj / .down_proj or "
                    f"from all {self.num_experts} of {m['prefix']}.{{e}}.{ename}.weight)")
        return self.base.where(plan[1] if plan[0] != "stack" else plan[1][0])

    def consumes(self, hf_name: str) -> bool:
        """Whether a checkpoint tensor feeds the model through this view (per-expert / fused / renamed)."""
        if _CKPT_EXPERT.search(hf_name):
            return True
        return self.mixtral and bool(re.search(r"\.mlp\.gate\.weight$", hf_name))


def moe_tensor_source(config, base):
    """Family ``tensor_adapter`` hook: wrap a checkpoint ``TensorSource`` for the MoE families."""
    return MoeTensorSource(config, base)


def hf_expert_tensors(config, hf_param_name: str, value):
    """Checkpoint tensors for one stacked expert param (the reverse of ``MoeTensorSource``).

    ``<P>.experts.gate_proj [E, I, H]`` becomes ``[(<P>.experts.{e}.gate_proj.weight, value[e]), ...]``
    (``w1/w3/w2`` for Mixtral): the hub's and ModelOpt's per-expert export layout. Non-expert names return
    ``[(name, value)]``. ``fuse_gate_up`` builds the transformers-5 fused tensor instead.
    """
    m = _EXPERT_PARAM.match(hf_param_name)
    if m is None:
        return [(hf_param_name, value)]
    prefix, proj = m["prefix"], m["proj"]
    ename = expert_names_for(config)[_PROJ.index(proj)]
    return [(f"{prefix}.{e}.{ename}.weight", value[e]) for e in range(value.shape[0])]


def fuse_gate_up(gate, up):
    """``gate [E, I, H]``, ``up [E, I, H]`` -> transformers-5 ``gate_up_proj [E, 2I, H]``."""
    import numpy as np

    return np.concatenate([np.asarray(gate), np.asarray(up)], axis=1)
