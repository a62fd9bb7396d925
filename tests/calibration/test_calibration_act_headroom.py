"""``nvfp4_act_headroom`` against nvidia-modelopt 0.47's ``NVFP4ActHeadroomCalibrator`` (CPU): the histogram and the
amax from the same activations, its options, and the recipe end to end against ModelOpt's ``mtq.quantize``
(tiny HF Llama, float32; ModelOpt's NVFP4 kernels emulated in numpy as in ``test_calibration_local_hessian``)."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.calibration.act_headroom import (
    HeadroomSettings,
    block_amax_histogram,
    headroom_amax,
)
from jaxquant.calibration.algorithms import resolve_algorithm
from jaxquant.errors import RecipeError, UnsupportedError

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _batches(seed, n=3, shape=(2, 7, 48), spread=6.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, shape[-1]))
        x[..., :16] *= 0.0 if seed % 2 else 1.0  # an all-zero block column (not counted) on odd seeds
        out.append(x.astype(np.float32))
    return out


@pytest.mark.parametrize("seed,settings", [
    (0, HeadroomSettings()), (1, HeadroomSettings()), (2, HeadroomSettings(anchor_percentile=10.0, rho=64.0)),
    (3, HeadroomSettings(upper_percentile=100.0)), (4, HeadroomSettings(anchor_percentile=50.0, rho=2.0)),
    (5, HeadroomSettings(anchor_percentile=100.0, upper_percentile=100.0, rho=28000.0))])
def test_histogram_and_amax_equal_modelopts(seed, settings):
    torch = pytest.importorskip("torch")
    from modelopt.torch.quantization.calib.nvfp4_act_headroom import NVFP4ActHeadroomCalibrator

    ref = NVFP4ActHeadroomCalibrator(block_size=16, anchor_percentile=settings.anchor_percentile,
                                     upper_percentile=settings.upper_percentile, rho=settings.rho)
    hist = np.zeros(512, np.int64)
    running = np.float32(0)
    for x in _batches(seed, shape=(2, 7, 40 if seed == 3 else 48)):  # 40: a ragged tail block
        ref.collect(torch.from_numpy(x))
        hist += np.asarray(block_amax_histogram(jnp.asarray(x), 16))
        running = max(running, np.float32(np.abs(x).max()))
    np.testing.assert_array_equal(hist, ref._hist.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.compute_amax()
        got = headroom_amax(hist, running, settings)
    assert np.float32(got) == np.float32(want.item()), (got, want)


def test_padding_counts_nowhere():
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(block_amax_histogram(jnp.asarray(x), 16, jnp.asarray(mask))),
                                  np.asarray(block_amax_histogram(jnp.asarray(x[mask][None]), 16)))
    assert headroom_amax(np.zeros(512, np.int64), np.float32(0), HeadroomSettings()) is None


def test_options():
    algo, opts = resolve_algorithm({"method": "nvfp4_act_headroom", "anchor_percentile": 2, "rho": 100,
                                    "weight_scale_algorithm": {"method": "mse", "fp8_scale_sweep": True,
                                                               "shared_states": None}})
    assert algo.name == "nvfp4_act_headroom" and opts["headroom"] == HeadroomSettings(2.0, 99.99, 100.0)
    assert opts["weight_algorithm"] == "mse" and opts["settings"].fp8_scale_sweep
    assert resolve_algorithm("nvfp4_act_headroom")[1]["weight_algorithm"] == "max"
    for bad, err in (({"rho": 28672}, RecipeError), ({"anchor_percentile": 0}, RecipeError),
                     ({"upper_percentile": 101}, RecipeError), ({"weight_scale_algorithm": "awq_lite"}, RecipeError),
                     ({"distributed_sync": True}, UnsupportedError),
                     ({"weight_scale_algorithm": {"method": "max", "layerwise": True}}, UnsupportedError),
                     ({"weight_scale_algorithm": {"method": "mse", "bogus": 1}}, UnsupportedError)):
        with pytest.raises(err):
            resolve_algorithm({"method": "nvfp4_act_headroom", **bad})


@pytest.mark.parametrize("weights", ["max", pytest.param("local_hessian", marks=pytest.mark.slow)])
def test_recipe_equals_modelopt(tiny_llama, monkeypatch, weights):
    """Every input amax (and static weight amax) of the recipe equal to ModelOpt's on the same model and tokens (the
    default rho gives every input ``rho * P_anchor``)."""
    from test_calibration_local_hessian import _dynamic_kernel_on_cpu, _ids, _modelopt
    from test_calibration_mse import _static_kernel_on_cpu

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.recipe import load_recipe

    _static_kernel_on_cpu(monkeypatch)
    _dynamic_kernel_on_cpu(monkeypatch)
    recipe = load_recipe("general/ptq/nvfp4_act_headroom-kv_fp8_cast")
    cfg = recipe.quantize_config()
    cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if "bmm" not in e.get("quantizer_name", "")]  # no KV on CPU
    if weights != "max":
        cfg["algorithm"]["weight_scale_algorithm"] = {"method": weights}
        cfg["quant_cfg"] = [dict(e, cfg={**e["cfg"], "block_sizes": {**e["cfg"]["block_sizes"], "type": "static"}})
                            if e.get("quantizer_name") == "*weight_quantizer" and e.get("cfg") else e
                            for e in cfg["quant_cfg"]]
    tmodel, d = tiny_llama
    ids = _ids()
    ref_model = _modelopt(tmodel, cfg, ids)
    loaded = load_hf(d, dtype=jnp.float32)
    batches = [(ids[i:i + 2].astype(np.int32), np.ones((2, 16), np.int32)) for i in range(0, len(ids), 2)]
    state = quantize(loaded.model, copy.deepcopy(cfg), batches, progress=False).calibration_state
    n = 0
    for name, mod in ref_model.named_modules():
        for role in ("input", "weight") if weights != "max" else ("input",):  # dynamic q/k/v weights: unified
            q = getattr(mod, f"{role}_quantizer", None)
            if q is None or not q.is_enabled:
                continue
            ours = state[f"{name}.{role}_quantizer._amax"]
            ref = q._amax.detach().float().numpy().reshape(ours.shape)
            np.testing.assert_array_equal(ours, ref, err_msg=f"{name}.{role}")
            if role == "input":  # rho * a bin centre: 2^(14 - 40 + (i + 0.5) * 80 / 512), not a plain max
                n += 1
                k = (np.log2(float(ours)) + 26.0) / (80 / 512) - 0.5
                assert abs(k - round(k)) < 1e-3, (name, float(ours))
    assert n == 7
