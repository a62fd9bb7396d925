"""MoE routers under a recipe without a router exclusion: transformers 5's routers (``Qwen3MoeTopKRouter``,
``MixtralTopKRouter``) are not ``nn.Linear``, so ModelOpt attaches no quantizer to them and they stay unquantized
whatever the recipe says; jaxquant's router ``Linear`` holds quantizers (so that exclusions match) that no recipe
enables. Checked against ModelOpt's ``set_quantizer_by_cfg`` on the same transformers models."""

import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_families import write_tiny_family  # noqa: E402

from jaxquant.recipe import apply_recipe, preset_recipe  # noqa: E402


@pytest.mark.parametrize("family,cls", [("qwen3_moe", "Qwen3MoeForCausalLM"), ("mixtral", "MixtralForCausalLM")])
def test_a_recipe_without_router_exclusion_leaves_the_router_unquantized_like_modelopt(tmp_path, family, cls):
    pytest.importorskip("modelopt.torch.quantization")
    import transformers
    from _recipe_oracle import TorchOracle, our_attrs
    import modelopt.torch.quantization as mtq
    from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES
    from modelopt.torch.quantization.conversion import replace_quant_module

    from jaxquant.converters import load_hf

    src = write_tiny_family(family, tmp_path / "ck")
    torch_model = getattr(transformers, cls).from_pretrained(str(src))
    assert not any("mlp.gate" in n and n.endswith("quantizer") for n, _ in torch_model.named_modules())
    replace_quant_module(torch_model)
    assert not any(".gate." in n + "." and "quantizer" in n for n, _ in torch_model.named_modules())
    cfg = mtq.update_quant_cfg_with_kv_cache_quant(QUANT_CFG_CHOICES["nvfp4_fp8_mha"],  # no router exclusion
                                                   KV_QUANT_CFG_CHOICES["fp8"]["quant_cfg"])
    expected = TorchOracle(family, torch_model).apply(cfg["quant_cfg"])
    loaded = load_hf(src, dtype=jnp.float32)
    res = apply_recipe(loaded.model, preset_recipe("nvfp4_fp8_mha", "fp8"), warn=False)
    got = {n: our_attrs(c) for n, c in res.configs.items()}
    router = [n for n in got if ".gate." in n and ".experts." not in n]  # Mixtral: block_sparse_moe.gate (hub names)
    assert router and all(got[n] is None for n in router), router
    assert all(res.quantizers[p] is None for p in res.quantizers if ".gate." in p + "." and "experts" not in p)
    for name, attrs in got.items():
        if name in expected:
            assert attrs == expected[name], name
    assert not any(".gate." in n and ".experts." not in n and a is not None for n, a in expected.items())
