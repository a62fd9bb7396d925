"""``ModelConfig``: one frozen description of a decoder, built from an HF ``config.json`` dict.

Every supported family is the same decoder with a few switches (q/k/v bias, q/k norm, (1+w) RMSNorm,
embedding scale, sliding-window layers, per-layer-type rope, soft-capping, ...). Which switches a
family sets is *data*: ``ARCHITECTURES`` maps an HF architecture name (``config.json["architectures"][0]``)
to a ``FamilySpec``. ``ModelConfig.from_hf_config`` reads the HF dict through that spec, filling the
defaults transformers' config class would use for keys the file omits.

Extension points (used by the MoE / Gemma 4 families):

* ``FamilySpec.config_hook`` (``"module:function"``): called as ``hook(text_cfg, fields)`` after the
  generic parsing; it may add or change entries of ``fields`` (MoE sizes, ``mlp_kinds``,
  ``extras``) before the frozen ``ModelConfig`` is built.
* ``FamilySpec.mlp_classes`` maps an MLP kind (``ModelConfig.mlp_kinds[i]``) to ``"module:Class"``;
  ``"dense"`` is the gated MLP of ``layers.py``.
* ``FamilySpec.layer_class`` / ``model_class``: the decoder-layer and top-level module classes.
* ``ModelConfig.extras``: a sorted tuple of ``(name, hashable value)`` pairs for family-specific
  settings that have no field here (read them with ``config.extra(name, default)``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from typing import Any

from jaxquant.errors import CheckpointError, UnsupportedError
from jaxquant.models.partition import DECODER_RULES, MOE_RULES

FULL = "full_attention"
SLIDING = "sliding_attention"


def import_object(ref: str) -> Any:
    """Resolve ``"package.module:attr"`` to the object (used for the lazy class references)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters of one layer type (transformers' ``rope_parameters`` entry)."""

    rope_type: str = "default"  # default | linear | dynamic | llama3 | yarn | proportional
    theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn", "proportional")

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, max_position_embeddings: int, where: str) -> "RopeConfig":
        rope_type = d.get("rope_type", d.get("type", "default")) or "default"
        if rope_type not in cls.SUPPORTED:
            raise UnsupportedError(
                f"{where}: rope_type {rope_type!r} is not supported; supported: {', '.join(cls.SUPPORTED)}."
            )

        def f(key):
            v = d.get(key)
            return None if v is None else float(v)

        omp = d.get("original_max_position_embeddings")
        if omp is None and rope_type in ("llama3", "yarn"):
            omp = max_position_embeddings
        theta = d.get("rope_theta")
        return cls(
            rope_type=rope_type,
            theta=float(theta if theta is not None else 10000.0),
            factor=f("factor"),
            low_freq_factor=f("low_freq_factor"),
            high_freq_factor=f("high_freq_factor"),
            original_max_position_embeddings=None if omp is None else int(omp),
            partial_rotary_factor=float(d.get("partial_rotary_factor") or 1.0),
            attention_factor=f("attention_factor"),
            beta_fast=f("beta_fast"),
            beta_slow=f("beta_slow"),
            mscale=f("mscale"),
            mscale_all_dim=f("mscale_all_dim"),
            truncate=bool(d.get("truncate", True)),
        )


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """How one HF architecture maps onto the shared decoder (pure data).

    Attributes:
      family: short family name ("llama", "gemma3", ...).
      model_types: accepted ``model_type`` values of the (text) config.
      text_config_key: key of the nested text config in multimodal configs, else None.
      text_prefix: HF name prefix of the decoder stack (``"model."`` or ``"model.language_model."``).
      legacy_renames: ``(old_prefix, canonical_prefix)`` pairs for checkpoints written by older
        transformers (e.g. ``language_model.model.`` -> ``model.language_model.``).
      qkv_bias / o_bias / mlp_bias: fixed bias switches; None reads ``attention_bias`` / ``mlp_bias``.
      qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3).
      norm_offset: 1.0 for Gemma's ``x * (1 + w)`` RMSNorm (weights stored around 0), else 0.0.
      sandwich_norms: Gemma's post-attention / pre- and post-feedforward norms.
      embed_scale: multiply embeddings by sqrt(hidden_size) (rounded to the param dtype).
      act_key: config key of the MLP activation.
      sliding: "none" (never), "all" (every layer when sliding_window is set: Mistral),
        "qwen" (``use_sliding_window`` + ``max_window_layers``), "pattern" (``layer_types`` or
        ``sliding_window_pattern``: Gemma).
      rope_per_layer_type: rope parameters differ per layer type (Gemma).
      local_rope_theta_key: legacy key of the sliding layers' rope theta (Gemma 3).
      query_pre_attn_scalar: attention scale is ``query_pre_attn_scalar**-0.5`` (Gemma).
      attn_softcap / final_softcap: read ``attn_logit_softcapping`` / ``final_logit_softcapping``
        (only where transformers applies them).
      defaults: values transformers' config class uses when ``config.json`` omits the key.
    """

    family: str
    model_types: tuple[str, ...]
    text_config_key: str | None = None
    text_prefix: str = "model."
    legacy_renames: tuple[tuple[str, str], ...] = ()
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: bool = False
    act_key: str = "hidden_act"
    sliding: str = "none"
    rope_per_layer_type: bool = False
    local_rope_theta_key: str | None = None
    query_pre_attn_scalar: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()
    config_hook: str | None = None
    mlp_classes: tuple[tuple[str, str], ...] = (("dense", "jaxquant.models.layers:MLP"),)
    layer_class: str = "jaxquant.models.decoder:DecoderLayer"
    model_class: str = "jaxquant.models.decoder:CausalLM"
    # "module:function(config, source) -> TensorSource": a view of the checkpoint in the NNX layout (MoE families
    # stack per-expert / split fused expert tensors); the view's ``consumes(hf_name)`` marks tensors it uses.
    tensor_adapter: str | None = None
    # how the parameters are laid out over a jax Mesh: ``(NNX path regex, per-dimension mesh axes)`` pairs
    # (``models/partition.py``; used by ``jaxquant.mesh``)
    partition_rules: tuple[tuple[str, tuple], ...] = DECODER_RULES


_LLAMA_DEFAULTS = (
    ("rms_norm_eps", 1e-6),
    ("hidden_act", "silu"),
    ("tie_word_embeddings", False),
    ("attention_bias", False),
    ("mlp_bias", False),
    ("max_position_embeddings", 2048),
    ("rope_theta", 10000.0),
)
_GEMMA3_DEFAULTS = (
    ("rms_norm_eps", 1e-6),
    ("hidden_activation", "gelu_pytorch_tanh"),
    ("tie_word_embeddings", True),
    ("attention_bias", False),
    ("max_position_embeddings", 131072),
    ("head_dim", 256),
    ("query_pre_attn_scalar", 256),
    ("sliding_window", 4096),
    ("sliding_window_pattern", 6),
    ("rope_theta", 1_000_000.0),
    ("rope_local_base_freq", 10_000.0),
    ("final_logit_softcapping", None),
    ("attn_logit_softcapping", None),
)
_GEMMA3 = dict(
    model_types=("gemma3_text",),
    qkv_bias=None,
    o_bias=None,
    mlp_bias=False,
    qk_norm=True,
    norm_offset=1.0,
    sandwich_norms=True,
    embed_scale=True,
    act_key="hidden_activation",
    sliding="pattern",
    rope_per_layer_type=True,
    local_rope_theta_key="rope_local_base_freq",
    query_pre_attn_scalar=True,
    attn_softcap=False,  # Gemma3Attention stores attn_logit_softcapping but never applies it
    final_softcap=True,
    defaults=_GEMMA3_DEFAULTS,
)

_GEMMA4_DEFAULTS = (
    ("rms_norm_eps", 1e-6),
    ("hidden_activation", "gelu_pytorch_tanh"),
    ("tie_word_embeddings", True),
    ("attention_bias", False),
    ("max_position_embeddings", 131072),
    ("head_dim", 256),
    ("num_key_value_heads", 4),
    ("sliding_window", 512),
    ("sliding_window_pattern", 6),
    ("final_logit_softcapping", None),
)
_GEMMA4 = dict(
    model_types=("gemma4_text",),
    qkv_bias=None,
    o_bias=None,
    qk_norm=True,
    norm_offset=0.0,  # Gemma4RMSNorm multiplies by the weight itself (not 1 + w)
    sandwich_norms=True,
    embed_scale=True,
    act_key="hidden_activation",
    sliding="pattern",
    rope_per_layer_type=True,
    final_softcap=True,
    defaults=_GEMMA4_DEFAULTS,
    config_hook="jaxquant.models.gemma4:gemma4_config_hook",  # per-layer geometry, PLE, KV sharing, MoE
    model_class="jaxquant.models.gemma4:Gemma4ForCausalLM",
    tensor_adapter="jaxquant.models.moe:moe_tensor_source",
    partition_rules=MOE_RULES,
)

ARCHITECTURES: dict[str, FamilySpec] = {
    "LlamaForCausalLM": FamilySpec(family="llama", model_types=("llama",), defaults=_LLAMA_DEFAULTS),
    "MistralForCausalLM": FamilySpec(
        family="mistral",
        model_types=("mistral",),
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        sliding="all",
        defaults=_LLAMA_DEFAULTS + (("sliding_window", 4096), ("max_position_embeddings", 131072)),
    ),
    "Qwen2ForCausalLM": FamilySpec(
        family="qwen2",
        model_types=("qwen2",),
        qkv_bias=True,
        o_bias=False,
        mlp_bias=False,
        sliding="qwen",
        defaults=_LLAMA_DEFAULTS
        + (("use_sliding_window", False), ("sliding_window", 4096), ("max_window_layers", 28)),
    ),
    "Qwen3ForCausalLM": FamilySpec(
        family="qwen3",
        model_types=("qwen3",),
        qk_norm=True,
        mlp_bias=False,
        sliding="qwen",
        defaults=_LLAMA_DEFAULTS
        + (("use_sliding_window", False), ("sliding_window", 4096), ("max_window_layers", 28), ("head_dim", 128)),
    ),
    "Gemma3ForCausalLM": FamilySpec(family="gemma3", **_GEMMA3),
    "Gemma3ForConditionalGeneration": FamilySpec(
        family="gemma3",
        text_config_key="text_config",
        text_prefix="model.language_model.",
        legacy_renames=(
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ),
        **_GEMMA3,
    ),
    # ---- MoE families and Gemma 4 (jaxquant/models/moe.py, gemma4.py; docs/moe.md)
    "MixtralForCausalLM": FamilySpec(
        family="mixtral",
        model_types=("mixtral",),
        qkv_bias=False,
        o_bias=False,
        sliding="all",
        defaults=_LLAMA_DEFAULTS
        + (("rope_theta", 1_000_000.0), ("rms_norm_eps", 1e-5), ("max_position_embeddings", 131072),
           ("sliding_window", None), ("num_local_experts", 8), ("num_experts_per_tok", 2)),
        config_hook="jaxquant.models.moe:mixtral_config_hook",
        mlp_classes=(("moe", "jaxquant.models.moe:SparseMoeBlock"),),
        layer_class="jaxquant.models.moe:MixtralDecoderLayer",
        tensor_adapter="jaxquant.models.moe:moe_tensor_source",
        partition_rules=MOE_RULES,
    ),
    "Qwen3MoeForCausalLM": FamilySpec(
        family="qwen3_moe",
        model_types=("qwen3_moe",),
        qk_norm=True,
        sliding="qwen",
        defaults=_LLAMA_DEFAULTS
        + (("use_sliding_window", False), ("sliding_window", 4096), ("max_position_embeddings", 32768),
           ("rms_norm_eps", 1e-6)),
        config_hook="jaxquant.models.moe:qwen3_moe_config_hook",
        mlp_classes=(("dense", "jaxquant.models.layers:MLP"), ("moe", "jaxquant.models.moe:SparseMoeBlock")),
        tensor_adapter="jaxquant.models.moe:moe_tensor_source",
        partition_rules=MOE_RULES,
    ),
    "Gemma4ForCausalLM": FamilySpec(family="gemma4", **_GEMMA4),
    "Gemma4ForConditionalGeneration": FamilySpec(
        family="gemma4", text_config_key="text_config", text_prefix="model.language_model.", **_GEMMA4
    ),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def family_spec(architecture: str) -> FamilySpec:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedError(
            f"architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}."
        ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the decoder needs, hashable (it is static metadata of the NNX modules)."""

    architecture: str
    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: float | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope: tuple[tuple[str, RopeConfig], ...] = ()
    attention_scale: float | None = None  # None -> head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # HF naming of this checkpoint (see converters/names.py)
    text_prefix: str = "model."
    # MoE (filled by the MoE families' config hooks)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    mlp_kinds: tuple[str, ...] = ()  # per layer; empty = all "dense"
    mlp_classes: tuple[tuple[str, str], ...] = (("dense", "jaxquant.models.layers:MLP"),)
    layer_class: str = "jaxquant.models.decoder:DecoderLayer"
    model_class: str = "jaxquant.models.decoder:CausalLM"
    extras: tuple[tuple[str, Any], ...] = ()

    # ------------------------------------------------------------------ per-layer views
    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else FULL

    def layer_sliding_window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_type(i) == SLIDING else None

    def rope_for(self, layer_type: str) -> RopeConfig:
        d = dict(self.rope)
        if layer_type in d:
            return d[layer_type]
        if FULL in d:
            return d[FULL]
        return RopeConfig()

    def mlp_kind(self, i: int) -> str:
        return self.mlp_kinds[i] if self.mlp_kinds else "dense"

    def mlp_class(self, kind: str) -> type:
        refs = dict(self.mlp_classes)
        if kind not in refs:
            raise UnsupportedError(f"{self.architecture}: no MLP class registered for kind {kind!r}.")
        return import_object(refs[kind])

    def extra(self, name: str, default: Any = None) -> Any:
        return dict(self.extras).get(name, default)

    @property
    def scaling(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    @property
    def spec(self) -> FamilySpec:
        return family_spec(self.architecture)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF parsing
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Build from an HF ``config.json`` dict.

        Raises:
          UnsupportedError: unknown architecture (lists the supported ones) or unsupported option.
          CheckpointError: a required key is missing.
        """
        archs = hf.get("architectures") or []
        if not archs:
            raise UnsupportedError(
                f"{source}: no 'architectures' entry, so the model family is unknown; supported "
                f"architectures: {', '.join(supported_architectures())}."
            )
        arch = archs[0]
        spec = family_spec(arch)
        top = dict(hf)
        if spec.text_config_key:
            if not isinstance(hf.get(spec.text_config_key), Mapping):
                raise CheckpointError(f"{source}: {arch} needs a '{spec.text_config_key}' section.")
            text = dict(hf[spec.text_config_key])
        else:
            text = dict(hf)
        t = dict(spec.defaults)
        t.update({k: v for k, v in text.items()})
        mt = text.get("model_type")
        if mt is not None and mt not in spec.model_types:
            raise UnsupportedError(
                f"{source}: model_type {mt!r} does not match architecture {arch} (expects "
                f"{', '.join(spec.model_types)})."
            )

        def req(key):
            if t.get(key) is None:
                raise CheckpointError(f"{source}: required key {key!r} is missing for {arch}.")
            return t[key]

        hidden = int(req("hidden_size"))
        n_heads = int(req("num_attention_heads"))
        n_layers = int(req("num_hidden_layers"))
        n_kv = int(t.get("num_key_value_heads") or n_heads)
        head_dim = int(t.get("head_dim") or hidden // n_heads)
        max_pos = int(t.get("max_position_embeddings") or 2048)
        attention_bias = bool(t.get("attention_bias", False))
        if t.get("use_bidirectional_attention") and t.get("use_bidirectional_attention") != "vision":
            # Gemma 4's "vision" mode only changes the mask around image tokens: text-only inputs are causal.
            raise UnsupportedError(f"{source}: bidirectional attention (use_bidirectional_attention) is not supported.")

        # --- sliding window and layer types
        sw = t.get("sliding_window")
        if spec.sliding == "none":
            sw = None
            layer_types = [FULL] * n_layers
        elif spec.sliding == "all":
            layer_types = [SLIDING if sw is not None else FULL] * n_layers
        elif spec.sliding == "qwen":
            if not t.get("use_sliding_window", False):
                sw = None
            lt = t.get("layer_types")
            if lt is None:
                mwl = int(t.get("max_window_layers") or 0)
                lt = [SLIDING if sw is not None and i >= mwl else FULL for i in range(n_layers)]
            layer_types = list(lt)
        elif spec.sliding == "pattern":
            lt = t.get("layer_types")
            if lt is None:
                pat = int(t.get("sliding_window_pattern") or 6)
                lt = [SLIDING if (i + 1) % pat else FULL for i in range(n_layers)]
            layer_types = list(lt)
        else:  # pragma: no cover - spec typo
            raise ValueError(spec.sliding)
        if len(layer_types) != n_layers:
            raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers.")
        if sw is None:
            layer_types = [FULL if x == SLIDING else x for x in layer_types]
        unknown = set(layer_types) - {FULL, SLIDING}
        if unknown and spec.family in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
            raise UnsupportedError(f"{source}: layer types {sorted(unknown)} are not supported.")

        # --- rope
        rope = _parse_rope(t, spec, sorted(set(layer_types)), max_pos, source)

        fields: dict[str, Any] = dict(
            architecture=arch,
            family=spec.family,
            model_type=mt or spec.model_types[0],
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            hidden_act=str(t.get(spec.act_key) or t.get("hidden_act") or "silu"),
            rms_norm_eps=float(t.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(
                top.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
                if spec.text_config_key
                else t.get("tie_word_embeddings", False)
            ),
            qkv_bias=attention_bias if spec.qkv_bias is None else spec.qkv_bias,
            o_bias=attention_bias if spec.o_bias is None else spec.o_bias,
            mlp_bias=bool(t.get("mlp_bias", False)) if spec.mlp_bias is None else spec.mlp_bias,
            qk_norm=spec.qk_norm,
            norm_offset=spec.norm_offset,
            sandwich_norms=spec.sandwich_norms,
            embed_scale=math.sqrt(hidden) if spec.embed_scale else None,
            layer_types=tuple(layer_types),
            sliding_window=None if sw is None else int(sw),
            rope=rope,
            attention_scale=(float(t["query_pre_attn_scalar"]) ** -0.5) if spec.query_pre_attn_scalar else None,
            attn_logit_softcapping=_opt_float(t.get("attn_logit_softcapping")) if spec.attn_softcap else None,
            final_logit_softcapping=_opt_float(t.get("final_logit_softcapping")) if spec.final_softcap else None,
            pad_token_id=t.get("pad_token_id"),
            bos_token_id=t.get("bos_token_id"),
            eos_token_id=tuple(t["eos_token_id"]) if isinstance(t.get("eos_token_id"), list) else t.get("eos_token_id"),
            text_prefix=spec.text_prefix,
            mlp_classes=spec.mlp_classes,
            layer_class=spec.layer_class,
            model_class=spec.model_class,
        )
        if spec.config_hook:
            import_object(spec.config_hook)(t, fields)
        if isinstance(fields.get("extras"), Mapping):
            fields["extras"] = tuple(sorted(fields["extras"].items()))
        _check_act(fields["hidden_act"], source)
        return cls(**fields)


def _opt_float(v):
    return None if v is None else float(v)


def _check_act(act: str, source: str):
    from jaxquant.models.layers import ACTIVATIONS

    if act not in ACTIVATIONS:
        raise UnsupportedError(
            f"{source}: activation {act!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}."
        )


def _parse_rope(t: Mapping[str, Any], spec: FamilySpec, layer_types: list[str], max_pos: int, source: str):
    """Per-layer-type ``RopeConfig`` from v5 ``rope_parameters`` or legacy ``rope_theta``/``rope_scaling``."""
    rp = t.get("rope_parameters")
    out: dict[str, RopeConfig] = {}
    nested = isinstance(rp, Mapping) and any(k in (FULL, SLIDING) for k in rp)
    if nested:
        for lt in layer_types:
            d = rp.get(lt) or rp.get(FULL) or {}
            out[lt] = RopeConfig.from_hf(d, max_position_embeddings=max_pos, where=f"{source} rope_parameters[{lt}]")
        return tuple(sorted(out.items()))
    if isinstance(rp, Mapping) and rp:
        base = dict(rp)
        base.setdefault("rope_theta", t.get("rope_theta"))
    else:
        base = dict(t.get("rope_scaling") or {})
        base["rope_theta"] = t.get("rope_theta")
    if base.get("rope_theta") is None:
        base["rope_theta"] = dict(spec.defaults).get("rope_theta", 10000.0)
    if "partial_rotary_factor" in t and "partial_rotary_factor" not in base:
        base["partial_rotary_factor"] = t["partial_rotary_factor"]
    for lt in layer_types:
        d = dict(base)
        if spec.rope_per_layer_type and lt == SLIDING:
            # Gemma 3: sliding layers use the local theta and no scaling
            d = {"rope_type": "default", "rope_theta": t.get(spec.local_rope_theta_key) or 10000.0}
        out[lt] = RopeConfig.from_hf(d, max_position_embeddings=max_pos, where=f"{source} rope")
    return tuple(sorted(out.items()))
