"""Sequential quantizers (a list ``cfg``: ModelOpt's ``SequentialQuantizer``) resolve like ModelOpt's
``set_quantizer_by_cfg``: hf_ptq's ``w4a8_awq_beta`` preset (INT4 blocks then FP8 weights, FP8 inputs) on the tiny
torch models, part by part (``weight_quantizer.0`` / ``.1``), and one ``TensorQuantizer`` holds the chain."""

import copy

import pytest
from _recipe_oracle import collapse_sequential as _collapse
from _recipe_oracle import ours_with_chains as _ours

from jaxquant.quantizer.sequential import SequentialConfig, as_quantizer_config
from jaxquant.recipe import recipe_from_dict, resolve

pytest.importorskip("modelopt.torch.quantization")


def test_w4a8_awq_beta_resolves_like_modelopt(torch_oracles):
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    cfg = copy.deepcopy(QUANT_CFG_CHOICES["w4a8_awq_beta"])
    cfg["algorithm"] = "max"
    ours = recipe_from_dict(cfg)  # supported with max: no UnsupportedError
    for oracle in torch_oracles.values():
        expected = oracle.apply(cfg["quant_cfg"])
        res = resolve(ours, oracle.sites())
        assert _ours(res.configs) == _collapse(expected), oracle.name
        chains = [c for c in res.configs.values() if isinstance(c, tuple)]
        assert chains and all(as_quantizer_config(c).format == "int4_block128+fp8" for c in chains)


def test_an_unimplemented_chain_names_its_parts():
    from jaxquant.errors import UnsupportedError

    cfg = {"quant_cfg": [{"quantizer_name": "*weight_quantizer",
                          "cfg": [{"num_bits": (4, 3)}, {"num_bits": 4, "block_sizes": {-1: 128}}]}],
           "algorithm": "max"}
    with pytest.raises(UnsupportedError, match=r"sequential quantizer \(fp8 then int4_block128\)"):
        recipe_from_dict(cfg)
    chain = as_quantizer_config(recipe_from_dict(cfg, check_supported=False).quant_cfg[0].cfg)
    assert isinstance(chain, SequentialConfig) and chain.replace(enable=False).enable is False
    assert SequentialConfig(chain.parts).to_dict(exmy=True)[0]["num_bits"] == "e4m3"

