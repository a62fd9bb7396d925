"""Every shipped recipe and preset against ModelOpt 0.47 itself.

Two checks per recipe:
* the rule list equals the one ModelOpt's ``load_recipe`` produces for its built-in recipe of the
  same name (same patterns, parent classes, enable flags and attributes, in the same order);
* on tiny HF torch models converted by ModelOpt (Llama, Mixtral, Qwen3-MoE, Qwen2-MoE with fused
  v5 experts named ``..._weight_quantizers.N``), ``resolve`` gives every quantizer the state
  ModelOpt's ``set_quantizer_by_cfg`` leaves it in (enabled, num_bits, axis, block_sizes,
  use_constant_amax, constant_amax, dynamic type).
"""

import contextlib
import io
import re
import warnings

import pytest
from _recipe_oracle import collapse_sequential, our_attrs, ours_with_chains

from jaxquant.recipe import (
    builtin_root,
    kv_cache_qformat_choices,
    list_recipes,
    load_recipe,
    preset_recipe,
    qformat_choices,
    recipe_from_dict,
    resolve,
)
from jaxquant.recipe.recipe import algorithm_method

mo_recipe = pytest.importorskip("modelopt.recipe")

SHIPPED = list_recipes("general/ptq") + list_recipes("huggingface/gemma/ptq")
OWN = {"general/ptq/fp8_qkvo-nvfp4_mlp"}  # not a ModelOpt built-in


def _quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def _modelopt_quant_cfg(name):
    """ModelOpt's resolved quantize config for ``name`` (its own file, or ours for OWN)."""
    src = name if name not in OWN else str(builtin_root() / f"{name}.yaml")
    return _quiet(mo_recipe.load_recipe, src).quantize.model_dump()


def _canon(entries):
    return [(e.quantizer_name, e.parent_class, e.cfg, e.effective_enable) for e in entries]


def test_every_required_recipe_is_shipped():
    required = {
        "fp8_default-kv_fp8", "fp8_default-kv_fp8_cast", "nvfp4_default-kv_fp8",
        "nvfp4_default-kv_fp8_cast", "nvfp4_mlp_only-kv_fp8", "nvfp4_mlp_only-kv_fp8_cast",
        "nvfp4_experts_only-kv_fp8", "nvfp4_omlp_only-kv_fp8", "nvfp4_weight_only-kv_fp16",
        "nvfp4_weight_only-kv_fp8_cast", "fp8_qkvo-nvfp4_mlp",
    }
    assert {f"general/ptq/{n}" for n in required} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_rules_equal_modelopt(name):
    ours = load_recipe(name)
    theirs = _modelopt_quant_cfg(name)
    ref = recipe_from_dict(theirs, source=f"modelopt:{name}", check_supported=False)
    assert _canon(ours.quant_cfg) == _canon(ref.quant_cfg)
    assert ours.algorithm == theirs["algorithm"]
    assert ours.method == algorithm_method(theirs["algorithm"])  # null: no calibration at all
    assert not ours.unsupported(), ours.unsupported()
    if name not in OWN:
        desc = _quiet(mo_recipe.load_recipe, name).metadata
        assert ours.metadata.recipe_type == desc.recipe_type.value


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_resolution_equals_set_quantizer_by_cfg(name, torch_oracles):
    ours = load_recipe(name)
    theirs = _modelopt_quant_cfg(name)["quant_cfg"]
    for oracle in torch_oracles.values():
        expected = oracle.apply(theirs)
        res = resolve(ours, oracle.sites())
        got = {n: our_attrs(c) for n, c in res.configs.items()}
        assert got == expected, f"{name} on {oracle.name}"
        # Something is quantized on every model, except experts-only recipes on dense Llama.
        if not (oracle.name == "llama" and "experts_only" in name):
            assert res.enabled


@pytest.mark.parametrize("qformat", qformat_choices())
def test_presets_equal_hf_ptq_composition(qformat, torch_oracles):
    """preset_recipe(q, kv) == hf_ptq's QUANT_CFG_CHOICES[q] + appended KV_QUANT_CFG_CHOICES[kv]."""
    import modelopt.torch.quantization as mtq
    from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES

    for kv in kv_cache_qformat_choices():
        ours = preset_recipe(qformat, kv)
        cfg = QUANT_CFG_CHOICES[qformat]
        if kv != "none":
            cfg = _quiet(mtq.update_quant_cfg_with_kv_cache_quant, cfg,
                         KV_QUANT_CFG_CHOICES[kv]["quant_cfg"])
        ref = recipe_from_dict(cfg, source=f"hf_ptq {qformat}/{kv}", check_supported=False)
        assert _canon(ours.quant_cfg) == _canon(ref.quant_cfg), (qformat, kv)
        assert ours.algorithm == cfg["algorithm"] and not ours.unsupported()
        for oracle in (torch_oracles["llama"], torch_oracles["qwen3_moe"]):
            expected = oracle.apply(cfg["quant_cfg"])
            got = ours_with_chains(resolve(ours, oracle.sites()).configs)
            assert got == collapse_sequential(expected), (qformat, kv, oracle.name)


def test_required_presets_present():
    assert {"fp8", "nvfp4", "nvfp4_mlp_only", "nvfp4_experts_only", "nvfp4_omlp_only",
            "w4a16_nvfp4"} <= set(qformat_choices())
    assert {"none", "fp8", "fp8_cast", "nvfp4", "nvfp4_cast"} <= set(kv_cache_qformat_choices())


def test_hf_ptq_default_preset_is_fp8_with_fp8_cast_kv():
    r = preset_recipe()
    kv = [e for e in r.quant_cfg if e.quantizer_name == "*[kv]_bmm_quantizer"]
    assert len(kv) == 1 and kv[0].cfg.format == "fp8" and kv[0].cfg.use_constant_amax
    assert r.quant_cfg[-1] == kv[0]  # appended after the preset, as hf_ptq does


def test_legacy_fp8_qkvo_resolves_like_the_list_form(torch_oracles):
    """The never-shipped legacy dict recipe (trailing ``default``) == our list-form recipe, and ==
    ModelOpt applying the same dict with ``default`` moved first (the old semantics)."""
    import yaml

    legacy_path = "tests/recipe/data/fp8_qkvo-nvfp4_mlp-legacy.yaml"
    legacy = load_recipe(legacy_path)
    listed = load_recipe("general/ptq/fp8_qkvo-nvfp4_mlp")
    assert legacy.quant_cfg[0].quantizer_name == "*" and not legacy.quant_cfg[0].effective_enable
    raw = yaml.safe_load(open(legacy_path))["ptq_cfg"]["quant_cfg"]
    hoisted = {"default": raw["default"], **{k: v for k, v in raw.items() if k != "default"}}
    hoisted = recipe_from_dict({"quant_cfg": hoisted}, check_supported=False).quantize_config()
    for oracle in torch_oracles.values():
        sites = oracle.sites()
        a = resolve(legacy, sites).configs
        b = resolve(listed, sites).configs
        assert a == b, oracle.name
        expected = oracle.apply(hoisted["quant_cfg"])
        assert {n: our_attrs(c) for n, c in a.items()} == expected
        fmts = resolve(listed, sites).formats
        for n, f in fmts.items():
            if any(p in n for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and "bmm" not in n \
                    and "output_quantizer" not in n:
                assert f == "fp8", n
            elif ".mlp." in n and "shared_expert_gate" not in n and "output_quantizer" not in n:
                assert f == "nvfp4", n
            else:
                assert f is None, n


def test_legacy_default_unhoisted_would_disable_everything(torch_oracles):
    """Why hoisting matters: ModelOpt 0.47 keeps a legacy ``default`` where it is, so a trailing
    ``default: {enable: false}`` switches every quantizer off."""
    import yaml

    raw = yaml.safe_load(open("tests/recipe/data/fp8_qkvo-nvfp4_mlp-legacy.yaml"))
    theirs = torch_oracles["llama"].apply(
        recipe_from_dict({"quant_cfg": [{k: v} for k, v in raw["ptq_cfg"]["quant_cfg"].items()]},
                         check_supported=False).quantize_config()["quant_cfg"])
    assert all(v is None for v in theirs.values())
    ours = resolve(load_recipe("tests/recipe/data/fp8_qkvo-nvfp4_mlp-legacy.yaml"),
                   torch_oracles["llama"].sites())
    assert ours.enabled


def test_every_modelopt_preset_either_ships_or_names_what_it_needs():
    """hf_ptq's --qformat vocabulary: each name resolves, or the error says which algorithm / format is missing."""
    from jaxquant.errors import UnsupportedError
    from jaxquant.recipe.presets import MODELOPT_QFORMATS, PENDING_QFORMATS

    shipped = set(qformat_choices())
    assert set(MODELOPT_QFORMATS) == shipped | set(PENDING_QFORMATS)
    assert not shipped & set(PENDING_QFORMATS)
    for name, needs in PENDING_QFORMATS.items():
        with pytest.raises(UnsupportedError, match="it needs " + re.escape(needs)):
            preset_recipe(name)
    assert preset_recipe("int8_smoothquant").algorithm == "smoothquant"
    assert preset_recipe("int4_awq").algorithm == {"method": "awq_lite", "alpha_step": 0.1}
