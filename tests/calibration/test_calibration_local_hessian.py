"""``local_hessian`` calibration against nvidia-modelopt's own ``local_hessian_calibrate`` on CPU (tiny HF Llama,
float32), its options, and the ``nvfp4_w4a4_weight_local_hessian`` preset through ``quantize``.

ModelOpt's NVFP4 fake quant has no CPU path: its static (weights) and dynamic (inputs) kernels are replaced by the
numpy emulations of ``tests/numerics/_numerics_ref.py`` that jaxquant's fake quant is tested bit-exact against
(``test_calibration_mse._static_kernel_on_cpu``); the rest (max calibration, the pass with weight quantizers off,
``_LocalHessianAccumulator``, ``NVFP4MSECalibrator`` with the Hessian error) is ModelOpt's code.

The per-block Hessians come from two different float32 forwards (torch's and XLA's), equal up to summation order;
a block whose best two candidates are that close can choose differently. The tests assert identical amax where
ModelOpt's choice is not within that rounding of a tie, and at most 1 % of blocks differing overall.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.calibration import quantize
from jaxquant.calibration.algorithms import resolve_algorithm
from jaxquant.calibration.mse import MseSettings
from jaxquant.errors import DataError, RecipeError, UnsupportedError

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "numerics"))
from test_calibration_mse import NVFP4_STATIC, _static_kernel_on_cpu  # noqa: E402

NVFP4_DYNAMIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def _cfg(inputs: bool, **algo):
    cfg = [{"quantizer_name": "*", "enable": False},
           {"quantizer_name": "*weight_quantizer", "cfg": NVFP4_STATIC}]
    if inputs:
        cfg.append({"quantizer_name": "*input_quantizer", "cfg": NVFP4_DYNAMIC})
    cfg += [{"quantizer_name": "*lm_head*", "enable": False}, {"quantizer_name": "*embed*", "enable": False}]
    return {"quant_cfg": cfg, "algorithm": {"method": "local_hessian", **algo}}


def _dynamic_kernel_on_cpu(monkeypatch):
    """ModelOpt's dynamic NVFP4 fake quant (Triton) replaced by its numpy emulation."""
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tqm
    import torch
    from _numerics_ref import triton_dynamic_np

    def dynamic(x, block_size, amax, bias, num_bits, scale_bits, *_):
        assert bias is None and num_bits == (2, 1) and scale_bits == (4, 3)
        y = triton_dynamic_np(x.detach().float().numpy(), amax.detach().float().numpy().max(), block_size)
        return torch.from_numpy(y).to(x.dtype)

    monkeypatch.setattr(tqm, "dynamic_block_quant", dynamic)


def _ids():
    rng = np.random.default_rng(7)
    return rng.integers(0, 128, (4, 16)).astype(np.int64)


def _modelopt(model, cfg, ids):
    import modelopt.torch.quantization as mtq
    import torch

    m = copy.deepcopy(model)

    def loop(mm):
        for i in range(0, len(ids), 2):
            mm(torch.from_numpy(ids[i:i + 2]))

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(m, copy.deepcopy(cfg), forward_loop=loop)
    return m


@pytest.mark.parametrize("inputs", [pytest.param(False, marks=pytest.mark.slow), True], ids=["weights_only", "w4a4"])
def test_block_amax_equals_modelopt_local_hessian(tiny_llama, monkeypatch, inputs):
    """Every block amax (and shared global amax) equal to ModelOpt's; the Hessian changes some choices of the plain
    squared-error sweep (so the comparison can fail)."""
    from jaxquant.calibration.mse import search_site
    from jaxquant.calibration.sites import quantizer_sites
    from jaxquant.converters import load_hf

    _static_kernel_on_cpu(monkeypatch)
    _dynamic_kernel_on_cpu(monkeypatch)
    tmodel, d = tiny_llama
    ids = _ids()
    cfg = _cfg(inputs)
    ref_model = _modelopt(tmodel, cfg, ids)
    loaded = load_hf(d, dtype=jnp.float32)
    batches = [(ids[i:i + 2].astype(np.int32), np.ones((2, 16), np.int32)) for i in range(0, len(ids), 2)]
    cfg["algorithm"]["debug"] = True
    r = quantize(loaded.model, copy.deepcopy(cfg), batches, progress=False)
    state = r.calibration_state
    n = diff = 0
    for name, mod in ref_model.named_modules():
        q = getattr(mod, "weight_quantizer", None)
        if q is None or not q.is_enabled:
            continue
        ours = state[f"{name}.weight_quantizer._amax"]
        ref = q._amax.detach().float().numpy().reshape(ours.shape)
        assert float(q.global_amax) == float(state[f"{name}.weight_quantizer._global_amax"]), name
        n += ours.size
        diff += int(np.sum(ours != ref))
    assert n == sum(v.size for k, v in state.items() if k.endswith("weight_quantizer._amax")) > 0
    assert diff == 0, f"{diff} of {n} block amax differ from ModelOpt's"
    site = next(s for s in quantizer_sites(loaded.model) if s.path.endswith("layers.0.mlp.down_proj.weight_quantizer"))
    assert site.path in r.stats.local_hessians
    plain = np.asarray(search_site(site, MseSettings(fp8_scale_sweep=True)))
    assert np.any(plain.reshape(-1) != state["model.layers.0.mlp.down_proj.weight_quantizer._amax"].reshape(-1))


def test_options_are_parsed_by_the_algorithm():
    algo, opts = resolve_algorithm({"method": "local_hessian", "block_size": 32, "debug": True,
                                    "distributed_sync": True, "step_size": 0.2})
    assert algo.name == "local_hessian" and opts["block_size"] == 32 and opts["debug"]
    assert opts["settings"] == MseSettings(step_size=0.2, fp8_scale_sweep=True)  # sweep on by default
    assert resolve_algorithm({"method": "local_hessian", "fp8_scale_sweep": False})[1]["settings"] == MseSettings()
    for bad, err in (({"sync_expert_weight_amax": True}, UnsupportedError), ({"bogus": 1}, UnsupportedError),
                     ({"moe_calib_experts_ratio": 0.5}, UnsupportedError), ({"block_size": 0}, RecipeError),
                     ({"block_size": 1.5}, RecipeError), ({"step_size": -1}, RecipeError)):
        with pytest.raises(err, match=next(iter(bad)) if err is UnsupportedError else None):
            resolve_algorithm({"method": "local_hessian", **bad})


def test_preset_runs_and_needs_data():
    """``--qformat nvfp4_w4a4_weight_local_hessian`` resolves and calibrates a jaxquant model (every linear but the
    head gets a Hessian); without data it refuses (ModelOpt would skip the algorithm)."""
    from flax import nnx

    from jaxquant.models import ModelConfig, build_model
    from jaxquant.recipe.presets import preset_recipe

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "tie_word_embeddings": False, "max_position_embeddings": 32}
    recipe = preset_recipe("nvfp4_w4a4_weight_local_hessian", "none")
    assert recipe.algorithm == {"method": "local_hessian", "fp8_scale_sweep": True}
    m = build_model(ModelConfig.from_hf_config(cfg), dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(DataError, match="local_hessian"):
        quantize(m, recipe, None, progress=False)
    ids = np.random.default_rng(0).integers(1, 64, (2, 8)).astype(np.int32)
    r = quantize(m, recipe, [(ids, np.ones_like(ids))], progress=False)
    assert r.algorithm == "local_hessian"
    amax = r.calibration_state["model.layers.0.mlp.down_proj.weight_quantizer._amax"]
    g = r.calibration_state["model.layers.0.mlp.down_proj.weight_quantizer._global_amax"]
    from jaxquant.calibration.mse import fp8_scale_candidates

    assert amax.shape == (32, 3) and np.all(np.isin(amax, np.float32(g) * fp8_scale_candidates()))  # exact codes


@pytest.mark.parametrize("algorithm", [{"method": "local_hessian"},
                                       {"method": "nvfp4_act_headroom", "anchor_percentile": 5, "rho": 64,
                                        "weight_scale_algorithm": {"method": "local_hessian"}}],
                         ids=["local_hessian", "act_headroom"])
def test_layerwise_gives_the_same_state(algorithm):
    """Both passes layer by layer (the Hessians and the histograms travel in the stage executables like any amax)."""
    from test_calibration_mse import _heavy_llama

    cfg = _cfg(True)
    cfg["algorithm"] = algorithm
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 101, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    batches = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    states = []
    for layerwise in (False, True):
        states.append(quantize(_heavy_llama(), copy.deepcopy(cfg), batches, progress=False,
                               layerwise=layerwise).calibration_state)
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k], err_msg=k)
