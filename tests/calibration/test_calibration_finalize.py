"""finalize() on hand-built calibration states: MoE sync and fallbacks, fused siblings, NaN checks."""

from __future__ import annotations

import numpy as np
import pytest

from jaxquant.calibration.finalize import (
    MOE_FALLBACK_AMAX,
    SHARED_PATTERNS,
    finalize,
    fused_sibling_groups,
)
from jaxquant.errors import NonFiniteError
from jaxquant.quantizer import QuantizerConfig

FP8 = QuantizerConfig(num_bits=(4, 3))
NVFP4 = QuantizerConfig.from_dict({"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}})
NVFP4_STATIC = QuantizerConfig.from_dict({"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static", "scale_bits": "e4m3"}})
KV_CAST = QuantizerConfig(num_bits=(4, 3), use_constant_amax=True)

A = "._amax"


def _experts_state(layer_amax: dict[int, float], n: int = 4, proj: str = "gate_proj", pre="model.layers.0.mlp.experts"):
    state, configs = {}, {}
    for e in range(n):
        name = f"{pre}.{e}.{proj}.input_quantizer"
        state[name + A] = np.float32(layer_amax.get(e, 0.0))
        configs[name] = NVFP4
    return state, configs


def test_moe_uncalibrated_experts_get_sibling_max():
    state, configs = _experts_state({0: 1.5, 2: 3.25})  # experts 1 and 3 saw no token
    out, rep = finalize(state, configs)
    vals = [float(out[f"model.layers.0.mlp.experts.{e}.gate_proj.input_quantizer{A}"]) for e in range(4)]
    assert vals == [3.25] * 4
    assert rep.uncalibrated_experts == {"model.layers.0.mlp.experts.*.gate_proj.input_quantizer": [1, 3]}
    assert rep.moe_groups == 1 and not rep.moe_fallbacks
    assert float(state[f"model.layers.0.mlp.experts.1.gate_proj.input_quantizer{A}"]) == 0.0  # input untouched


def test_moe_layer_without_tokens_gets_fallback_never_zero():
    state, configs = _experts_state({})
    s2, c2 = _experts_state({1: 2.0}, pre="model.layers.1.mlp.experts")
    state.update(s2)
    configs.update(c2)
    with pytest.warns(UserWarning, match="no expert"):
        out, rep = finalize(state, configs)
    for e in range(4):
        assert float(out[f"model.layers.0.mlp.experts.{e}.gate_proj.input_quantizer{A}"]) == MOE_FALLBACK_AMAX
        assert float(out[f"model.layers.1.mlp.experts.{e}.gate_proj.input_quantizer{A}"]) == 2.0
    assert rep.moe_fallbacks == ["model.layers.0.mlp.experts.*.gate_proj.input_quantizer"]
    assert all(np.all(v > 0) and np.all(np.isfinite(v)) for v in out.values())


def test_moe_sync_is_per_layer_and_projection_and_skips_weights_by_default():
    state, configs = {}, {}
    for layer, proj, vals in ((0, "w1", [1, 2]), (0, "w2", [5, 0]), (1, "w1", [7, 3])):
        for e, v in enumerate(vals):
            n = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.input_quantizer"
            state[n + A] = np.float32(v)
            configs[n] = FP8
            w = n.replace("input_quantizer", "weight_quantizer")
            state[w + A] = np.float32(10 * v + 1)
            configs[w] = FP8
    out, _ = finalize(state, configs)
    get = lambda l, p, e, r="input": float(out[f"model.layers.{l}.block_sparse_moe.experts.{e}.{p}.{r}_quantizer{A}"])  # noqa: E731
    assert get(0, "w1", 0) == get(0, "w1", 1) == 2
    assert get(0, "w2", 0) == get(0, "w2", 1) == 5
    assert get(1, "w1", 0) == get(1, "w1", 1) == 7
    assert get(0, "w1", 0, "weight") == 11 and get(0, "w1", 1, "weight") == 21  # weights are per expert
    out2, _ = finalize(state, configs, sync_expert_weight_amax=True, unify_fused=False)
    assert float(out2[f"model.layers.0.block_sparse_moe.experts.0.w1.weight_quantizer{A}"]) == 21


def test_moe_sync_ignores_constant_and_dynamic_quantizers():
    state = {f"m.experts.{e}.up_proj.input_quantizer{A}": np.float32(v) for e, v in enumerate([0.0, 4.0])}
    dyn = QuantizerConfig(num_bits=(4, 3), type="dynamic")
    configs = {f"m.experts.{e}.up_proj.input_quantizer": dyn for e in range(2)}
    out, rep = finalize(state, configs)
    assert float(out[f"m.experts.0.up_proj.input_quantizer{A}"]) == 0.0 and rep.moe_groups == 0


def _linears(names, wcfg, icfg, wvals, ivals, prefix="model.layers.0.self_attn"):
    state, configs = {}, {}
    for n, w, i in zip(names, wvals, ivals):
        base = f"{prefix}.{n}"
        configs[base + ".weight_quantizer"] = wcfg
        configs[base + ".input_quantizer"] = icfg
        state[base + ".weight_quantizer" + A] = np.float32(w)
        if icfg is not None and icfg.needs_calibration:
            state[base + ".input_quantizer" + A] = np.float32(i)
    return state, configs


def test_nvfp4_qkv_unified_fp8_not():
    names = ("q_proj", "k_proj", "v_proj")
    state, configs = _linears(names, NVFP4, NVFP4, [1.0, 3.0, 2.0], [4.0, 4.5, 4.25])
    s2, c2 = _linears(("gate_proj", "up_proj"), FP8, FP8, [1.0, 2.0], [3.0, 3.5], prefix="model.layers.0.mlp")
    state.update(s2)
    configs.update(c2)
    out, rep = finalize(state, configs)
    for n in names:
        assert float(out[f"model.layers.0.self_attn.{n}.weight_quantizer{A}"]) == 3.0
        assert float(out[f"model.layers.0.self_attn.{n}.input_quantizer{A}"]) == 4.5
    assert float(out[f"model.layers.0.mlp.gate_proj.weight_quantizer{A}"]) == 1.0  # FP8: separate scales
    assert float(out[f"model.layers.0.mlp.up_proj.input_quantizer{A}"]) == 3.5
    assert rep.fused_groups == [tuple(f"model.layers.0.self_attn.{n}" for n in names)]


def test_w4a16_and_static_nvfp4_unify_weights_only():
    state, configs = _linears(("gate_proj", "up_proj"), NVFP4, None, [1.0, 2.0], [0, 0], prefix="model.layers.3.mlp")
    out, _ = finalize(state, configs)
    assert float(out[f"model.layers.3.mlp.gate_proj.weight_quantizer{A}"]) == 2.0
    # static blocks: per-block amax stays, the global amax is shared
    state, configs = {}, {}
    for n, g in (("q_proj", 5.0), ("k_proj", 7.0)):
        base = f"model.layers.0.self_attn.{n}.weight_quantizer"
        configs[base] = NVFP4_STATIC
        configs[base.replace("weight", "input")] = NVFP4
        state[base + A] = np.full((4, 2), g / 2, np.float32)
        state[base + "._global_amax"] = np.float32(g)
        state[base.replace("weight", "input") + A] = np.float32(1.0)
    out, _ = finalize(state, configs)
    assert float(out["model.layers.0.self_attn.q_proj.weight_quantizer._global_amax"]) == 7.0
    np.testing.assert_array_equal(out[f"model.layers.0.self_attn.q_proj.weight_quantizer{A}"], np.full((4, 2), 2.5))


def test_per_expert_gate_up_unified_and_mixed_formats_reported():
    state, configs = {}, {}
    for e, (g, u) in enumerate(((1.0, 2.0), (4.0, 3.0))):
        for n, v in (("gate_proj", g), ("up_proj", u)):
            base = f"model.layers.0.mlp.experts.{e}.{n}"
            configs[base + ".weight_quantizer"] = NVFP4
            configs[base + ".input_quantizer"] = NVFP4
            state[base + ".weight_quantizer" + A] = np.float32(v)
            state[base + ".input_quantizer" + A] = np.float32(1.0 + e)
    s2, c2 = _linears(("q_proj", "k_proj"), NVFP4, NVFP4, [1.0, 2.0], [1.0, 1.0])
    c2["model.layers.0.self_attn.k_proj.weight_quantizer"] = FP8
    state.update(s2)
    configs.update(c2)
    with pytest.warns(UserWarning, match="different quantization formats"):
        out, rep = finalize(state, configs)
    assert float(out[f"model.layers.0.mlp.experts.0.up_proj.weight_quantizer{A}"]) == 2.0
    assert float(out[f"model.layers.0.mlp.experts.1.gate_proj.weight_quantizer{A}"]) == 4.0
    assert float(out[f"model.layers.0.mlp.experts.0.gate_proj.input_quantizer{A}"]) == 2.0  # MoE sync first
    assert len(rep.fused_conflicts) == 1 and rep.fused_conflicts[0][0][1].endswith("k_proj")
    assert float(out[f"model.layers.0.self_attn.q_proj.weight_quantizer{A}"]) == 1.0  # conflict: untouched


def test_shared_patterns_are_modelopts():
    groups = fused_sibling_groups(["a.q_proj", "a.k_proj", "a.v_proj", "a.o_proj", "b.q_proj",
                                   "m.experts.0.w1", "m.experts.0.w3", "m.experts.0.w2", "m.experts.1.w1"])
    assert groups == [("a.q_proj", "a.k_proj", "a.v_proj"), ("m.experts.0.w1", "m.experts.0.w3")]
    assert SHARED_PATTERNS[0] == r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_amax_is_an_error_naming_the_quantizer(bad):
    state = {f"model.layers.2.mlp.down_proj.input_quantizer{A}": np.float32(bad),
             f"model.layers.2.mlp.up_proj.input_quantizer{A}": np.float32(1.0)}
    with pytest.raises(NonFiniteError, match=r"model\.layers\.2\.mlp\.down_proj\.input_quantizer"):
        finalize(state, {k[: -len(A)]: FP8 for k in state})


def test_zero_amax_reported():
    state = {f"x.o_proj.input_quantizer{A}": np.float32(0.0)}
    _, rep = finalize(state, {"x.o_proj.input_quantizer": FP8})
    assert rep.zero_amax == ["x.o_proj.input_quantizer"]
    assert KV_CAST.fixed_amax == 448.0  # constant-amax quantizers carry no state at all
