"""A list of calibration algorithms (ModelOpt's ``algorithm: [ ... ]``): parsing as ModelOpt accepts and refuses it,
and ``[max, mse]`` against nvidia-modelopt 0.47's ``mtq.quantize`` on CPU (tiny HF Llama, FP8)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.calibration.algorithms import resolve_algorithm
from jaxquant.errors import RecipeError, UnsupportedError

sys.path.insert(0, str(Path(__file__).resolve().parent))

FP8_CFG = [{"quantizer_name": "*", "enable": False},
           {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": 0}},
           {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
           {"quantizer_name": "*lm_head*", "enable": False}]


def test_parsing():
    algo, opts = resolve_algorithm(["max", None, {"method": "mse", "fp8_scale_sweep": True,
                                                  "shared_states": {"weight_global_amax": {"patterns": ["x"]}}}])
    assert algo.name == "max+mse" and [a.name for a, _ in opts["steps"]] == ["max", "mse"]
    assert opts["steps"][1][1]["settings"].fp8_scale_sweep and opts["shared_patterns"] == ("x",)  # the last step's
    assert resolve_algorithm([]) == (None, {}) and resolve_algorithm([None]) == (None, {})  # ModelOpt: no mode
    with pytest.raises(RecipeError, match="nested"):
        resolve_algorithm([["max"]])
    with pytest.raises(UnsupportedError, match="bogus"):
        resolve_algorithm(["max", {"method": "mse", "bogus": 1}])
    with pytest.raises(UnsupportedError, match="lsq"):
        resolve_algorithm(["max", "lsq"])
    assert [a.name for a, _ in resolve_algorithm(["svdquant", "max"])[1]["steps"]] == ["svdquant", "max"]
    with pytest.raises(UnsupportedError, match=r"algorithm\[1\]: awq_clip after svdquant"):
        resolve_algorithm([{"method": "svdquant", "lowrank": 8}, "awq_clip"])


def test_recipe_with_a_list_is_supported():
    from jaxquant.recipe.recipe import recipe_from_dict

    r = recipe_from_dict({"quant_cfg": FP8_CFG, "algorithm": ["max", {"method": "local_hessian"}]})
    assert r.unsupported() == []
    bad = recipe_from_dict({"quant_cfg": FP8_CFG, "algorithm": ["max", "lsq"]}, check_supported=False)
    assert bad.unsupported() == ["calibration algorithm 'lsq'"]


def test_max_then_mse_equals_modelopt(tiny_llama):
    pytest.importorskip("torch")
    from test_calibration_local_hessian import _ids, _modelopt

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf

    cfg = {"quant_cfg": FP8_CFG, "algorithm": [{"method": "max"}, {"method": "mse"}]}
    tmodel, d = tiny_llama
    ids = _ids()
    ref = dict(_modelopt(tmodel, cfg, ids).named_modules())
    loaded = load_hf(d, dtype=jnp.float32)
    batches = [(ids[i:i + 2].astype(np.int32), np.ones((2, 16), np.int32)) for i in range(0, len(ids), 2)]
    res = quantize(loaded.model, copy.deepcopy(cfg), iter(batches), progress=False)  # a one-shot iterator
    assert res.algorithm == "max+mse"
    n = 0
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        ours = res.calibration_state[f"{name}.weight_quantizer._amax"]
        theirs = ref[name].weight_quantizer._amax.detach().numpy().reshape(ours.shape)
        np.testing.assert_array_equal(ours, theirs, name)
        w = np.abs(ref[name].weight.detach().numpy()).max(axis=1, keepdims=True)
        n += int(np.sum(ours != w))
        np.testing.assert_allclose(res.calibration_state[f"{name}.input_quantizer._amax"],
                                   float(ref[name].input_quantizer._amax), rtol=1e-6, err_msg=name)
    assert n > 0  # mse moved some amax away from max's
