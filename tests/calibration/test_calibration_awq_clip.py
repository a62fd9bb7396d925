"""``awq_clip`` / ``awq_full`` (and ``awq_lite`` on NVFP4) through ModelOpt's presets against nvidia-modelopt 0.47's
``mtq.quantize`` on CPU (tiny HF Llama, float32, NVFP4 kernels emulated as in ``test_calibration_local_hessian``):
the clip ratios, smoothing scales and amax; and the options."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.calibration.algorithms import resolve_algorithm
from jaxquant.calibration.awq_clip import clip_ratios
from jaxquant.errors import RecipeError, UnsupportedError

sys.path.insert(0, str(Path(__file__).resolve().parent))

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def test_clip_ratios_are_modelopts():
    torch = pytest.importorskip("torch")
    for lo, step in ((0.5, 0.05), (0.3, 0.1), (0.9, 0.03), (0.25, 1.0)):
        ref = [round(float(k), 2) for k in torch.arange(lo, 1.0, step)] + [1.0]
        assert list(clip_ratios(lo, step)) == ref


def test_options():
    algo, opts = resolve_algorithm({"method": "awq_clip", "min_clip_ratio": 0.8, "shrink_step": 0.1,
                                    "max_co_batch_size": 8, "debug": True})
    assert algo.name == "awq_clip" and opts["ratios"] == (0.8, 0.9, 1.0)
    _, full = resolve_algorithm({"method": "awq_full", "alpha_step": 0.5, "max_tokens_per_batch": 16})
    assert full["lite"]["alpha_step"] == 0.5 and full["clip"]["max_tokens_per_batch"] == 16
    for method, bad, err in (("awq_clip", {"alpha_step": 0.1}, UnsupportedError),
                             ("awq_clip", {"min_clip_ratio": 1.0}, RecipeError),
                             ("awq_clip", {"shrink_step": 0}, RecipeError),
                             ("awq_full", {"max_co_batch_size": 0}, RecipeError),
                             ("awq_full", {"alpha": 1}, UnsupportedError),
                             ("awq_clip", {"layerwise": {"enable": True}}, UnsupportedError)):
        with pytest.raises(err):
            resolve_algorithm({"method": method, **bad})


@pytest.mark.parametrize("qformat", ["nvfp4_awq_clip", pytest.param("nvfp4_awq_full", marks=pytest.mark.slow),
                                     "nvfp4_awq_lite"])
def test_preset_equals_modelopt(tiny_llama, monkeypatch, qformat):
    """The same clip ratio per linear as ModelOpt; weight amax equal to ModelOpt's (q/k/v and gate/up: the max of
    ModelOpt's, as its export unifies them); input amax equal to float32 rounding of the two forwards. After
    ``awq_lite`` the smoothing scales (and so the smoothed weights' amax) agree to the last bit or so: jaxquant's
    ``alpha`` power is rounded once from float64, torch's vectorised float32 ``pow`` can differ by an ulp
    (``smoothing.power``)."""
    from test_calibration_local_hessian import _dynamic_kernel_on_cpu, _ids, _modelopt

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.recipe.presets import preset_recipe

    _dynamic_kernel_on_cpu(monkeypatch)
    recipe = preset_recipe(qformat, "none")
    cfg = recipe.quantize_config()
    tmodel, d = tiny_llama
    ids = _ids()
    ref_model = _modelopt(tmodel, cfg, ids)
    loaded = load_hf(d, dtype=jnp.float32)
    batches = [(ids[i:i + 2].astype(np.int32), np.ones((2, 16), np.int32)) for i in range(0, len(ids), 2)]
    res = quantize(loaded.model, recipe, batches, progress=False)
    state = res.calibration_state
    mods = dict(ref_model.named_modules())
    layer = "model.layers.0"
    for group in (("o_proj",), ("down_proj",), *FUSED):
        names = [f"{layer}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for p in group]
        want = max(float(mods[n].weight_quantizer._amax) for n in names)
        want_in = max(float(mods[n].input_quantizer._amax) for n in names)  # finalize unifies fused inputs too
        exact = qformat == "nvfp4_awq_clip"
        for n in names:
            ours = float(state[f"{n}.weight_quantizer._amax"])
            assert ours == want if exact else abs(ours - want) <= 1e-6 * want, (n, ours, want)
            q = mods[n].input_quantizer
            np.testing.assert_allclose(state[f"{n}.input_quantizer._amax"], want_in, rtol=1e-6, err_msg=n)
            if not exact:
                pqs = q._pre_quant_scale.detach().float().numpy()
                np.testing.assert_allclose(state[f"{n}.input_quantizer._pre_quant_scale"], pqs, rtol=1e-6, err_msg=n)
            if qformat != "nvfp4_awq_lite":  # ModelOpt's ratio: its amax over its (smoothed) weight's max
                theirs = float(mods[n].weight_quantizer._amax) / float(mods[n].weight.detach().abs().max())
                assert res.stats.awq_clip_ratios[n] == round(theirs, 2), n
    if qformat != "nvfp4_awq_lite":
        assert any(r < 1.0 for r in res.stats.awq_clip_ratios.values()), res.stats.awq_clip_ratios


def test_int4_block_clip_equals_modelopt(tiny_llama):
    """INT4 blocks of 32: every block's clipped amax equal to ModelOpt's per-block search (16 tokens a batch of 32:
    the sampling step is 2), and the search clipped a good part of the blocks."""
    from test_calibration_local_hessian import _ids, _modelopt

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf

    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                         {"quantizer_name": "*weight_quantizer",
                          "cfg": {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}}},
                         {"quantizer_name": "*lm_head*", "enable": False},
                         {"quantizer_name": "*embed*", "enable": False}],
           "algorithm": {"method": "awq_clip", "max_tokens_per_batch": 16}}
    tmodel, d = tiny_llama
    ids = _ids()
    ref = dict(_modelopt(tmodel, cfg, ids).named_modules())
    loaded = load_hf(d, dtype=jnp.float32)
    batches = [(ids[i:i + 2].astype(np.int32), np.ones((2, 16), np.int32)) for i in range(0, len(ids), 2)]
    state = quantize(loaded.model, cfg, batches, progress=False).calibration_state
    n = clipped = 0
    for name, mod in ref.items():
        q = getattr(mod, "weight_quantizer", None)
        if q is None or not q.is_enabled:
            continue
        ours = state[f"{name}.weight_quantizer._amax"]
        np.testing.assert_array_equal(ours, q._amax.detach().numpy().reshape(ours.shape), name)
        bmax = np.abs(mod.weight.detach().numpy()).reshape(ours.shape[0], -1, 32).max(-1).reshape(ours.shape)
        n += ours.size
        clipped += int(np.sum(ours < bmax))
    assert n > 0 and clipped > n // 4, (clipped, n)
