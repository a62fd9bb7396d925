"""The matcher: ModelOpt's set_quantizer_by_cfg semantics on names, pytrees and NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer import QuantizerConfig, TensorQuantizer
from jaxquant.recipe import (
    QuantizerSite,
    apply_recipe,
    load_recipe,
    normalize_quantizer_name,
    recipe_from_dict,
    resolve,
    resolve_pytree,
    sites_from_pytree,
)

FP8 = {"num_bits": "e4m3", "axis": None}
NVFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}
L = "nn.Linear"


def rules(*entries, algorithm="max"):
    return recipe_from_dict({"quant_cfg": list(entries), "algorithm": algorithm}, check_supported=False)


# ------------------------------------------------------------------------------ semantics
def test_later_rules_win_and_cfg_replaces_atomically():
    r = rules(
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": "e4m3", "axis": 0,
                                                        "use_constant_amax": True}},
        {"quantizer_name": "*q_proj.weight_quantizer", "cfg": {"num_bits": "e4m3"}},
    )
    res = resolve(r, [("a.q_proj.weight_quantizer", L), ("a.k_proj.weight_quantizer", L),
                      ("a.q_proj.input_quantizer", L)])
    # the later cfg replaces everything: axis and use_constant_amax go back to the defaults
    assert res.configs["a.q_proj.weight_quantizer"] == QuantizerConfig(num_bits=(4, 3))
    assert res.configs["a.k_proj.weight_quantizer"] == QuantizerConfig(num_bits=(4, 3), axis=0,
                                                                       use_constant_amax=True)
    assert res.configs["a.q_proj.input_quantizer"] is None
    assert res.last_rule == {"a.q_proj.weight_quantizer": 2, "a.k_proj.weight_quantizer": 1,
                             "a.q_proj.input_quantizer": 0}


def test_enable_only_toggles_and_keeps_attributes():
    r = rules(
        {"quantizer_name": "*", "cfg": NVFP4},
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*mlp*", "enable": True},
    )
    res = resolve(r, ["x.mlp.up.weight_quantizer", "x.attn.q.weight_quantizer"])
    assert res.formats == {"x.mlp.up.weight_quantizer": "nvfp4", "x.attn.q.weight_quantizer": None}


def test_enable_only_on_untouched_quantizer_gives_modelopt_defaults():
    res = resolve(rules({"quantizer_name": "*", "enable": True}),
                  [("l.weight_quantizer", L), ("l.input_quantizer", L), ("l.output_quantizer", L),
                   ("a.k_bmm_quantizer", "Attention")])
    assert res.formats == {"l.weight_quantizer": "int8_per_channel", "l.input_quantizer": "int8",
                           "l.output_quantizer": "int8", "a.k_bmm_quantizer": "int8"}
    assert not res.unsupported()  # ModelOpt's default (INT8, per channel for weights) is fake-quantizable


def test_cfg_with_enable_false_is_disabled_and_enable_true_brings_it_back():
    r = rules({"quantizer_name": "*", "cfg": FP8, "enable": False},
              {"quantizer_name": "*input_quantizer", "enable": True})
    res = resolve(r, ["a.weight_quantizer", "a.input_quantizer"])
    assert res.formats == {"a.weight_quantizer": None, "a.input_quantizer": "fp8"}


def test_parent_class_filter():
    r = rules({"quantizer_name": "*", "cfg": FP8},
              {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False})
    res = resolve(r, [QuantizerSite("emb.weight_quantizer", "nn.Embedding"),
                      QuantizerSite("lin.weight_quantizer", L),
                      QuantizerSite("sub.weight_quantizer", ("MyLinear", L)),
                      QuantizerSite("odd.weight_quantizer", None)])
    assert res.formats == {"emb.weight_quantizer": None, "lin.weight_quantizer": "fp8",
                           "sub.weight_quantizer": "fp8", "odd.weight_quantizer": "fp8"}


def test_fnmatch_semantics():
    r = rules({"quantizer_name": "*", "enable": False},
              {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": FP8},
              {"quantizer_name": "model.layers.?.mlp*", "cfg": NVFP4},
              {"quantizer_name": "*LM_HEAD*", "cfg": FP8})
    names = ["m.q_bmm_quantizer", "m.k_bmm_quantizer", "m.v_bmm_quantizer",
             "model.layers.3.mlp.up_proj.weight_quantizer",
             "model.layers.13.mlp.up_proj.weight_quantizer", "lm_head.weight_quantizer"]
    f = resolve(r, names).formats
    assert [f[n] for n in names] == [None, "fp8", "fp8", "nvfp4", None, None]  # case-sensitive


def test_fused_expert_names_match_in_normalized_form():
    assert normalize_quantizer_name("m.experts.gate_up_proj_weight_quantizers.3") == \
        "m.experts.gate_up_proj_weight_quantizer"
    assert normalize_quantizer_name("m.experts.down_proj_input_quantizer.0") == \
        "m.experts.down_proj_input_quantizer"
    r = rules({"quantizer_name": "*", "enable": False},
              {"quantizer_name": "*weight_quantizer", "cfg": NVFP4},
              {"quantizer_name": "*weight_quantizers.1", "enable": False})
    f = resolve(r, [f"m.experts.gate_up_proj_weight_quantizers.{i}" for i in range(3)]).formats
    assert list(f.values()) == ["nvfp4", None, "nvfp4"]  # the raw name matches too


def test_duplicate_site_names_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        resolve(rules({"quantizer_name": "*", "enable": False}), ["a", "a"])


def test_report_and_unmatched_rules():
    recipe = load_recipe("general/ptq/nvfp4_experts_only-kv_fp8")
    sites = [QuantizerSite(f"model.layers.{i}.{m}.{q}_quantizer", L)
             for i in range(4) for m in ("self_attn.q_proj", "mlp.up_proj") for q in ("weight", "input")]
    sites += [QuantizerSite(f"model.layers.{i}.self_attn.k_bmm_quantizer", "Attn") for i in range(4)]
    res = resolve(recipe, sites)
    assert res.counts() == {"fp8": 4, "disabled": 16}
    enabling = {r.entry.quantizer_name for r in res.unmatched_enabling_rules}
    assert enabling == {"*.experts.*weight_quantizer", "*.experts.*input_quantizer",
                        "*block_sparse_moe*weight_quantizer", "*block_sparse_moe*input_quantizer"}
    text = res.report()
    assert "model.layers.{0-3}.self_attn.k_bmm_quantizer" in text
    assert "fp8" in text and "counts: fp8 4, disabled 16" in text
    assert "WARNING: rules that enable or configure quantizers but matched nothing (4)" in text
    assert "'*.experts.*weight_quantizer' -> nvfp4" in text
    assert "exclusion rules that matched nothing" in text and "*router*" in text
    with pytest.raises(RecipeError, match="matched no quantizer"):
        res.check_unmatched(True)
    with pytest.raises(RecipeError, match=r"\*router\*"):
        res.check_unmatched("all")
    full = res.report(collapse=False, show_disabled=False)
    assert "model.layers.2.self_attn.k_bmm_quantizer" in full and "q_proj" not in full


# ------------------------------------------------------------------------------ pytrees
def _linen_params():
    import flax.linen as lnn

    class Block(lnn.Module):
        @lnn.compact
        def __call__(self, x):
            x = lnn.Embed(32, 16, name="embed_tokens")(x)
            h = lnn.Dense(16, name="q_proj")(x)
            h = lnn.Dense(32, name="up_proj")(h)
            return lnn.Dense(32, name="lm_head")(h)

    return Block().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))


def test_sites_from_linen_params():
    sites = sites_from_pytree(_linen_params())
    assert [(s.name, s.parent_class) for s in sites] == [
        ("embed_tokens.weight_quantizer", "nn.Embedding"),
        ("lm_head.weight_quantizer", L), ("lm_head.input_quantizer", L),
        ("q_proj.weight_quantizer", L), ("q_proj.input_quantizer", L),
        ("up_proj.weight_quantizer", L), ("up_proj.input_quantizer", L),
    ]
    f = resolve_pytree("general/ptq/fp8_default-kv_fp8", _linen_params()).formats
    assert f["q_proj.weight_quantizer"] == "fp8" and f["lm_head.weight_quantizer"] is None
    assert f["embed_tokens.weight_quantizer"] is None


def test_sites_from_plain_dict_hf_layout():
    params = {"model": {"embed_tokens": {"weight": np.zeros((10, 4))},
                        "layers": [{"mlp": {"gate_proj": {"weight": np.zeros((8, 4))},
                                            "gate": {"weight": np.zeros((2, 4))}},
                                    "input_layernorm": {"weight": np.zeros(4)}}]},
              "lm_head": {"weight": np.zeros((10, 4))}}
    res = resolve_pytree(load_recipe("general/ptq/nvfp4_mlp_only-kv_fp8"), params)
    assert res.formats == {
        "model.embed_tokens.weight_quantizer": None,
        "model.layers.0.mlp.gate_proj.weight_quantizer": "nvfp4",
        "model.layers.0.mlp.gate_proj.input_quantizer": "nvfp4",
        "model.layers.0.mlp.gate.weight_quantizer": None,  # router
        "model.layers.0.mlp.gate.input_quantizer": None,
        "lm_head.weight_quantizer": None,
        "lm_head.input_quantizer": None,
    }


# ------------------------------------------------------------------------------ NNX models
class Linear(nnx.Module):
    modelopt_class = "nn.Linear"

    def __init__(self, din, dout, rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (dout, din)))
        self.input_quantizer = TensorQuantizer()
        self.weight_quantizer = TensorQuantizer()


class Embedding(nnx.Module):
    modelopt_class = "nn.Embedding"

    def __init__(self, n, d, rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (n, d)))
        self.weight_quantizer = TensorQuantizer()


class Attention(nnx.Module):
    def __init__(self, d, rngs):
        self.q_proj = Linear(d, d, rngs)
        self.o_proj = Linear(d, d, rngs)
        self.k_bmm_quantizer = TensorQuantizer()
        self.v_bmm_quantizer = TensorQuantizer()


class Experts(nnx.Module):
    """Stacked experts: one [E, out, in] weight per projection, one quantizer per tensor."""

    def __init__(self, e, d, f, rngs):
        self.e = e
        self.up_proj = nnx.Param(jax.random.normal(rngs.params(), (e, f, d)))
        self.up_proj_weight_quantizer = TensorQuantizer(instances=e)
        self.up_proj_input_quantizer = TensorQuantizer(instances=e)

    def quantizer_names(self, attr):
        kind = "weight" if "weight" in attr else "input"
        return [f"{i}.up_proj.{kind}_quantizer" for i in range(self.e)]

    def quantizer_tensor_shape(self, attr):
        return self.up_proj.value.shape if "weight" in attr else None


class MoE(nnx.Module):
    def __init__(self, e, d, f, rngs):
        self.gate = Linear(d, e, rngs)
        self.experts = Experts(e, d, f, rngs)


class Layer(nnx.Module):
    def __init__(self, d, rngs, moe):
        self.self_attn = Attention(d, rngs)
        self.mlp = MoE(4, d, 32, rngs) if moe else Linear(d, 32, rngs)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = Embedding(64, 16, rngs)
        self.layers = nnx.List([Layer(16, rngs, moe=i == 1) for i in range(2)])


class CausalLM(nnx.Module):
    def __init__(self, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.model = Model(rngs)
        self.lm_head = Linear(16, 64, rngs)


def test_apply_recipe_configures_every_quantizer():
    m = CausalLM()
    res = apply_recipe(m, "general/ptq/nvfp4_mlp_only-kv_fp8")
    L0, L1 = m.model.layers[0], m.model.layers[1]
    assert L0.mlp.weight_quantizer.format == "nvfp4" and L0.mlp.input_quantizer.format == "nvfp4"
    assert L0.self_attn.q_proj.weight_quantizer.config is None
    assert L0.self_attn.k_bmm_quantizer.format == "fp8"
    assert L1.mlp.experts.up_proj_weight_quantizer.format == "nvfp4"
    assert L1.mlp.experts.up_proj_weight_quantizer.amax.value.shape == (4, 1, 1)
    assert L1.mlp.gate.weight_quantizer.config is None  # '*mlp.gate.*' router exclusion
    assert m.lm_head.weight_quantizer.config is None and m.model.embed_tokens.weight_quantizer.config is None
    # names: dotted NNX paths; stacked experts resolved per instance
    assert "model.layers.1.mlp.experts.3.up_proj.weight_quantizer" in res.configs
    assert res.instances["model.layers.1.mlp.experts.up_proj_weight_quantizer"][0] == \
        "model.layers.1.mlp.experts.0.up_proj.weight_quantizer"
    assert res.quantizers["model.layers.1.mlp.experts.up_proj_weight_quantizer"].format == "nvfp4"
    assert "model.layers.1.mlp.experts.{0-3}.up_proj.weight_quantizer" in res.report()
    assert "model.layers.1.mlp.experts.up_proj_weight_quantizer" not in res.configs


def test_apply_recipe_tensor_shapes_for_per_channel_and_static_blocks():
    m = CausalLM()
    r = rules({"quantizer_name": "*", "enable": False},
              {"quantizer_name": "*q_proj.weight_quantizer", "cfg": {"num_bits": "e4m3", "axis": 0}},
              {"quantizer_name": "*experts*weight_quantizer",
               "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static", "scale_bits": "e4m3"}}})
    apply_recipe(m, r)
    assert m.model.layers[0].self_attn.q_proj.weight_quantizer.amax.value.shape == (16, 1)
    ex = m.model.layers[1].mlp.experts.up_proj_weight_quantizer
    assert ex.format == "nvfp4_static" and ex.amax.value.shape == (4, 32, 1)


def test_apply_recipe_rejects_differing_experts():
    r = rules({"quantizer_name": "*", "enable": False},
              {"quantizer_name": "*experts*", "cfg": NVFP4},
              {"quantizer_name": "*experts.2.*", "enable": False})
    with pytest.raises(UnsupportedError, match=r"experts\.2\.up_proj\.(input|weight)_quantizer") as ei:
        apply_recipe(CausalLM(), r)
    assert "model.layers.1.mlp.experts.up_proj_" in str(ei.value)


def test_apply_recipe_unsupported_format_names_the_quantizer():
    r = rules({"quantizer_name": "*", "enable": False},
              {"quantizer_name": "*lm_head.weight_quantizer",
               "cfg": {"num_bits": "e1m2", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}})
    with pytest.raises(UnsupportedError, match=r"(?s)lm_head\.weight_quantizer: format 'mx_e1m2'.*"
                                                r"Supported formats: fp8, fp8_per_channel"):
        apply_recipe(CausalLM(), r)


def test_apply_recipe_strict():
    with pytest.warns(UserWarning, match="block_sparse_moe"):
        apply_recipe(CausalLM(), "general/ptq/nvfp4_experts_only-kv_fp8")
    m = CausalLM()
    with pytest.raises(RecipeError, match="block_sparse_moe"):
        apply_recipe(m, "general/ptq/nvfp4_experts_only-kv_fp8", strict=True)
    res = apply_recipe(m, load_recipe("general/ptq/nvfp4_default-kv_fp8"), strict=True)
    assert res.counts()["nvfp4"] > 0
    with pytest.raises(RecipeError, match="router"):
        apply_recipe(m, "general/ptq/nvfp4_default-kv_fp8", strict="all")


def test_apply_recipe_disables_previous_configs():
    m = CausalLM()
    apply_recipe(m, "general/ptq/fp8_default-kv_fp8")
    assert m.model.layers[0].self_attn.q_proj.weight_quantizer.format == "fp8"
    apply_recipe(m, "general/ptq/nvfp4_mlp_only-kv_fp8")
    assert m.model.layers[0].self_attn.q_proj.weight_quantizer.config is None
    assert m.model.layers[0].self_attn.q_proj.weight_quantizer.amax is None


def test_warning_when_recipe_enables_nothing():
    from jaxquant.recipe import UnmatchedRuleWarning

    class Dense(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([Layer(16, nnx.Rngs(0), moe=False)])

    r = rules({"quantizer_name": "*", "enable": False},
              {"quantizer_name": "*.experts.*weight_quantizer", "cfg": NVFP4})
    with pytest.warns(UnmatchedRuleWarning, match="enables no quantizer"):
        apply_recipe(Dense(), r)
    with pytest.warns(UnmatchedRuleWarning, match=r"match nothing .*: \*block_sparse_moe\*weight"):
        apply_recipe(CausalLM(), "general/ptq/nvfp4_experts_only-kv_fp8")


def test_sites_from_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed_tokens = nnx.Embed(10, 8, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
            self.norm = nnx.RMSNorm(8, rngs=rngs)

    sites = sites_from_pytree(nnx.state(Net(nnx.Rngs(0)), nnx.Param))
    assert [(s.name, s.parent_class) for s in sites] == [
        ("embed_tokens.weight_quantizer", "nn.Embedding"),
        ("layers.0.weight_quantizer", L), ("layers.0.input_quantizer", L),
        ("layers.1.weight_quantizer", L), ("layers.1.input_quantizer", L),
    ]
    # quantizer state inside a quantized model is not mistaken for parameters
    m = CausalLM()
    apply_recipe(m, "general/ptq/fp8_default-kv_fp8")
    names = {s.name for s in sites_from_pytree(nnx.state(m))}
    assert "model.layers.0.self_attn.q_proj.weight_quantizer" in names
    assert not any("amax" in n for n in names)


def test_apply_recipe_matches_modelopt_names_through_name_map():
    m = CausalLM()
    hf = lambda p: "model.language_model." + p[len("model."):] if p.startswith("model.") else p  # noqa: E731
    r = rules({"quantizer_name": "*", "enable": False},
              {"quantizer_name": "model.language_model.layers.0.*weight_quantizer", "cfg": FP8},
              {"quantizer_name": "model.layers.1.*", "cfg": FP8})  # the NNX path: never matches
    res = apply_recipe(m, r, name_map=hf)
    assert m.model.layers[0].self_attn.q_proj.weight_quantizer.format == "fp8"
    assert m.model.layers[1].self_attn.q_proj.weight_quantizer.config is None
    assert res.names["model.layers.0.self_attn.q_proj.weight_quantizer"] == \
        ("model.language_model.layers.0.self_attn.q_proj.weight_quantizer",)
    assert "model.language_model.layers.1.mlp.experts.2.up_proj.weight_quantizer" in res.configs
    assert [u.index for u in res.unmatched_rules] == [2]
    assert "model.layers.0.self_attn.q_proj.weight_quantizer" in res.quantizers
