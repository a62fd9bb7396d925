"""apply_recipe on jaxquant's own NNX decoders == ModelOpt on the same transformers models.

Dense names coincide with ModelOpt's. Experts differ in layout only: jaxquant resolves per-expert
names (``mlp.experts.3.gate_proj.weight_quantizer``; Mixtral under ``block_sparse_moe`` with
w1/w3/w2, as ModelOpt's checkpoints name it), while ModelOpt on transformers-5 fused experts has
``mlp.experts.gate_up_proj_weight_quantizers.3`` and one shared ``gate_up_proj_input_quantizer``.
The test maps each of our names to ModelOpt's and compares the attributes; user rules written against either
naming resolve alike (``fused_expert_name`` aliases).
"""

import re
import warnings

import jax.numpy as jnp
import pytest
from _recipe_oracle import _tiny_models, our_attrs

from jaxquant.recipe import apply_recipe, builtin_root, list_recipes

models = pytest.importorskip("jaxquant.models")
mo_recipe = pytest.importorskip("modelopt.recipe")

_EXPERT = re.compile(
    r"^(?P<pre>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<role>\w+_quantizer)$"
)
_FUSED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
          "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}


def torch_name(ours: str) -> str | None:
    """ModelOpt's name (transformers-5 fused experts) for one of our quantizer names."""
    m = _EXPERT.match(ours)
    if not m:
        return ours
    fused = _FUSED[m["proj"]]
    if m["role"] == "weight_quantizer":
        return f"{m['pre']}.mlp.experts.{fused}_weight_quantizers.{m['e']}"
    if m["role"] == "input_quantizer":
        return f"{m['pre']}.mlp.experts.{fused}_input_quantizer"
    return None  # fused experts have no output quantizers (ours are always off)


@pytest.fixture(scope="module")
def pairs(torch_oracles):
    import flax.nnx as nnx

    out = {}
    for name, tm in _tiny_models().items():
        if name == "qwen2_moe":
            continue  # not a jaxquant architecture
        d = tm.config.to_dict()
        d["architectures"] = [type(tm).__name__]
        cfg = models.ModelConfig.from_hf_config(d)
        out[name] = (models.build_model(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)),
                     torch_oracles[name])
    return out


@pytest.mark.parametrize("recipe", list_recipes("general/ptq"))
def test_apply_recipe_on_jaxquant_models_matches_modelopt(recipe, pairs):
    src = recipe if "fp8_qkvo" not in recipe else str(builtin_root() / f"{recipe}.yaml")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        quant_cfg = mo_recipe.load_recipe(src).quantize.model_dump()["quant_cfg"]
    for name, (jm, oracle) in pairs.items():
        theirs = oracle.apply(quant_cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = apply_recipe(jm, recipe)
        compared = 0
        for ours, cfg in res.configs.items():
            t = torch_name(ours)
            if t is None or t not in theirs:
                assert cfg is None or "gate" in ours, (recipe, ours)  # routers Mixtral-side
                continue
            assert our_attrs(cfg) == theirs[t], (recipe, name, ours, t)
            compared += 1
        assert compared >= 30, (recipe, name)
        # every TensorQuantizer got the resolved config
        for path, cfg in res.quantizers.items():
            assert _get(jm, path).config == cfg, path


def _get(model, path):
    obj = model
    for p in path.split("."):
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    return obj


_BASE = [{"quantizer_name": "*", "enable": False},
         {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
         {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
         {"quantizer_name": "*lm_head*", "enable": False}, {"quantizer_name": "*router*", "enable": False},
         {"quantizer_name": "*mlp.gate.*", "enable": False}]
USER_RULES = {  # rules a user writes against ModelOpt's transformers-5 names, or against the checkpoints' names
    "gate_up_off": [{"quantizer_name": "*gate_up_proj*", "enable": False}],
    "fused_down_int8": [{"quantizer_name": "*experts.down_proj*", "cfg": {"num_bits": 8, "axis": None}}],
    "per_expert_names": [{"quantizer_name": "*experts.*.down_proj*", "enable": False}],
}


@pytest.mark.parametrize("case", sorted(USER_RULES))
def test_user_rules_on_expert_names_match_modelopt(case, pairs):
    """A rule written against ModelOpt's fused expert names (``*gate_up_proj*``: gate and up of every expert) selects
    the same experts in jaxquant, whose quantizers carry the hub's per-expert names (``fused_expert_name`` aliases).
    A rule written against the per-expert names (``*experts.*.down_proj*``) matches nothing in ModelOpt on
    transformers 5; jaxquant applies it (the union of both namings), the one documented difference."""
    quant_cfg = _BASE + USER_RULES[case]
    for name in ("mixtral", "qwen3_moe"):
        jm, oracle = pairs[name]
        theirs = oracle.apply(quant_cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = apply_recipe(jm, {"quant_cfg": quant_cfg, "algorithm": "max"})
        experts = 0
        for ours, cfg in res.configs.items():
            t = torch_name(ours)
            if t is None or t not in theirs:
                continue
            expert = t != ours
            experts += expert
            if case == "per_expert_names" and expert and ".down_proj" in ours:
                assert cfg is None and theirs[t] is not None, (name, ours)  # the documented difference
                continue
            assert our_attrs(cfg) == theirs[t], (case, name, ours, t)
        assert experts >= 24, (case, name)


def test_one_expert_by_its_fused_name_is_refused(pairs):
    """``*weight_quantizers.1`` (ModelOpt's name of expert 1's quantizers) now reaches jaxquant's stacked experts,
    whose instances share one config: refused naming the quantizer, not silently ignored."""
    from jaxquant.errors import UnsupportedError

    jm, _ = pairs["qwen3_moe"]
    with pytest.raises(UnsupportedError, match=r"experts\.down_proj_weight_quantizer holds 4 stacked instances"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_recipe(jm, {"quant_cfg": _BASE + [{"quantizer_name": "*weight_quantizers.1", "enable": False}],
                              "algorithm": "max"})
