"""SmoothQuant (``int8_smoothquant``) and AWQ-lite (``int4_awq``) against nvidia-modelopt 0.47 on CPU, on the same
tiny Llama and the same calibration tokens.

What must be identical, and is:
* given ModelOpt's per-channel activation amax, jaxquant's SmoothQuant scale, ``pre_quant_scale``, smoothed weight and
  weight / input amax (bit for bit, float32 and bfloat16);
* the alpha AWQ-lite chooses for every linear (end to end);
* given ModelOpt's calibrated state (``pre_quant_scale``, amax), the exported checkpoint, byte for byte: averaged q/k/v
  and gate/up ``pre_quant_scale`` with re-smoothed weights, AWQ's folding into the layernorms, ``pre_quant_scale``
  tensors, hf_quant_config.json and config.json.

What differs, and why: jaxquant's own activations differ from torch's in the last bits (XLA's RMSNorm ``rsqrt``,
softmax and matmul accumulation order are not torch's), so the per-channel activation statistics of a full
calibration run differ by a few ulps (about half of the SmoothQuant pre_quant_scale elements); AWQ's weight_scale, a
mean over the weight's rows, differs in about a quarter of its elements by 1-2 ulps (torch's CPU summation order);
and float32 ``pow`` is torch's vectorised Sleef pow vs a float64 pow rounded once. The tests bound all of these by
``_ULPS`` float32 ulps (relative), and the alphas AWQ picks are identical.
"""

import copy
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
from test_export_int4 import make_llama128  # noqa: E402

_ULPS = 16  # end-to-end statistics: relative difference bound in float32 ulps (cause: module doc)


def _batches():
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (2, 12), generator=g) for _ in range(2)]


def _modelopt(tmp_path, qformat, dtype="float32", debug=False):
    import modelopt.torch.quantization as mtq
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    cfg = copy.deepcopy(QUANT_CFG_CHOICES[qformat])
    if debug:
        algo = cfg["algorithm"]
        cfg["algorithm"] = {**({"method": algo} if isinstance(algo, str) else algo), "debug": True}
    src = tmp_path / "src"
    model = make_llama128(src, dtype)
    batches = _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(cfg), forward_loop=lambda m: [m(b) for b in batches])
    return model, src, cfg, batches


def _linears(model):

    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.is_enabled}


def _state_from_modelopt(model):
    """jaxquant's calibration state for ModelOpt's calibrated model: its pre_quant_scale p on the input quantizer,
    1/p (float32, what ModelOpt folded into the weight) on the weight quantizer, its amax."""
    from modelopt.torch.quantization.nn import SequentialQuantizer

    st = {}
    for name, m in _linears(model).items():
        iq, wq = m.input_quantizer, m.weight_quantizer
        p = iq._pre_quant_scale.float().numpy().copy()  # export changes the buffers in place
        st[f"{name}.input_quantizer._pre_quant_scale"] = p
        st[f"{name}.weight_quantizer._pre_quant_scale"] = np.float32(1.0) / p
        if isinstance(wq, SequentialQuantizer):  # W4A8_AWQ: INT4 block amax, then the FP8 part's (global) amax
            st[f"{name}.weight_quantizer._global_amax"] = wq[1]._amax.float().numpy().copy()
            wq = wq[0]
        st[f"{name}.weight_quantizer._amax"] = wq._amax.float().numpy().copy()
        if iq.is_enabled:
            st[f"{name}.input_quantizer._amax"] = iq._amax.float().numpy().copy()
    return st


def _jaxquant(src, cfg, batches=None, dtype="float32"):
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.recipe import apply_recipe

    loaded = load_hf(src, dtype=getattr(jnp, dtype))
    if batches is None:
        return loaded, apply_recipe(loaded.model, copy.deepcopy(cfg), warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantize(loaded.model, copy.deepcopy(cfg), [(b.numpy(), None) for b in batches], progress=False)
    return loaded, res


def _export_both(tmp_path, model, src, cfg):
    from jaxquant.calibration import load_calibration_state
    from jaxquant.calibration.max import set_quant_mode
    from jaxquant.export import export_hf

    st = _state_from_modelopt(model)
    R.modelopt_export(model, tmp_path / "mo", "float32")
    loaded, res = _jaxquant(src, cfg)
    load_calibration_state(loaded.model, st)
    set_quant_mode(loaded.model, "fake_quant")
    export_hf(loaded, tmp_path / "jq", resolution=res)
    return R.assert_same_export(tmp_path / "mo", tmp_path / "jq")


def _close(a, b, what):
    a, b = np.asarray(a, np.float32).reshape(-1), np.asarray(b, np.float32).reshape(-1)
    rel = np.abs(a - b) / np.maximum(np.abs(a), np.finfo(np.float32).tiny)
    assert rel.max() <= _ULPS * np.finfo(np.float32).eps, (what, rel.max(), (a != b).mean())
    return (a != b).mean()


# ----------------------------------------------------------------------------------------------- SmoothQuant
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smoothquant_scale_given_modelopt_statistics(tmp_path, dtype):
    """ModelOpt's ``_amax_for_smoothing`` (per-channel activation amax) in, its pre_quant_scale (rounded to the model
    dtype), smoothed weight and weight / input amax out, bit for bit."""
    import jax.numpy as jnp

    from jaxquant.calibration.smoothing import SmoothLinear, apply_smoothing, round_to
    from jaxquant.calibration.smoothquant import smoothing_scale

    model, src, cfg, _ = _modelopt(tmp_path, "int8_smoothquant", dtype)
    loaded, _ = _jaxquant(src, cfg, dtype=dtype)
    mods = dict(_linears(model))
    assert len(mods) == 14
    for name, m in mods.items():
        path = name.split(".")
        lin = loaded.model
        for p in path:
            lin = lin[int(p)] if p.isdigit() else getattr(lin, p)
        act = m.input_quantizer._amax_for_smoothing.float().numpy().reshape(-1)
        s = smoothing_scale(act, lin.weight[...], 1.0)
        np.testing.assert_array_equal(round_to(s, lin.weight.dtype), m.input_quantizer._pre_quant_scale.float().numpy(),
                                      err_msg=name)
        apply_smoothing(SmoothLinear(name, lin, lin.weight_quantizer, lin.input_quantizer), s, act)
        np.testing.assert_array_equal(np.asarray(lin.input_quantizer.pre_quant_scale.value),
                                      m.input_quantizer._pre_quant_scale.float().numpy(), err_msg=name)
        np.testing.assert_array_equal(np.asarray(lin.weight_quantizer.amax.value),
                                      m.weight_quantizer._amax.float().numpy(), err_msg=name)
        np.testing.assert_array_equal(np.asarray(lin.input_quantizer.amax.value).reshape(()),
                                      m.input_quantizer._amax.float().numpy().reshape(()), err_msg=name)
        w_smoothed = np.asarray(lin.weight_quantizer.scaled(jnp.asarray(lin.weight[...])).astype(jnp.float32))
        np.testing.assert_array_equal(w_smoothed, m.weight.detach().float().numpy(), err_msg=name)


def test_smoothquant_end_to_end_and_export(tmp_path):
    model, src, cfg, batches = _modelopt(tmp_path, "int8_smoothquant")
    _, res = _jaxquant(src, cfg, batches)
    st = res.calibration_state
    fracs = []
    for name, m in _linears(model).items():
        fracs.append(_close(m.input_quantizer._pre_quant_scale.float().numpy(),
                            st[f"{name}.input_quantizer._pre_quant_scale"], name))
        _close(m.weight_quantizer._amax.float().numpy(), st[f"{name}.weight_quantizer._amax"], name)
        _close(m.input_quantizer._amax.float().numpy(), st[f"{name}.input_quantizer._amax"], name)
    print(f"smoothquant end to end: {np.mean(fracs):.1%} of pre_quant_scale elements differ (ulps)")
    ref = _export_both(tmp_path, model, src, cfg)
    assert ref["model.layers.0.self_attn.q_proj.pre_quant_scale"][:2] == ("F32", (128,))
    assert ref["model.layers.0.self_attn.q_proj.pre_quant_scale"] == ref["model.layers.0.self_attn.k_proj.pre_quant_scale"]


# ----------------------------------------------------------------------------------------------- AWQ-lite
def test_awq_lite_statistics_alphas_and_export(tmp_path):
    from jaxquant.calibration.awq import alpha_grid, candidate_scale, weight_scale

    model, src, cfg, batches = _modelopt(tmp_path, "int4_awq", debug=True)
    loaded, _ = _jaxquant(src, cfg)
    _, res = _jaxquant(src, cfg, batches)
    alphas = res.stats.awq_alphas
    assert alpha_grid(0.1) == tuple(model.model.layers[0].self_attn.q_proj.awq_lite.loss)
    mods = _linears(model)
    assert len(mods) == 14 and set(alphas) == set(mods)
    for name, m in mods.items():
        h = m.awq_lite
        lin = loaded.model
        for p in name.split("."):
            lin = lin[int(p)] if p.isdigit() else getattr(lin, p)
        # the mean over 128 rows: torch's CPU sum order is not XLA's; ~25% of the means differ by 1-2 ulps
        _close(weight_scale(lin.weight[...], 128), h.weight_scale.numpy(), name)
        assert alphas[name] == h.best_alpha, (name, alphas[name], h.best_alpha, h.loss)
        _close(candidate_scale(h.act_scale.numpy(), h.weight_scale.numpy(), h.best_alpha), h.best_scale.numpy(), name)
        _close(1.0 / h.best_scale.numpy(), res.calibration_state[f"{name}.input_quantizer._pre_quant_scale"], name)
    ref = _export_both(tmp_path, model, src, cfg)
    assert "model.layers.0.self_attn.q_proj.pre_quant_scale" not in ref  # folded into input_layernorm
    assert ref["model.layers.0.self_attn.o_proj.pre_quant_scale"][:2] == ("F32", (128,))


# ----------------------------------------------------------------------------------------------- load back
@pytest.mark.parametrize("qformat", ["int8_smoothquant", "int4_awq"])
def test_smoothed_export_loads_back(tmp_path, qformat):
    """jaxquant's own calibration, exported and loaded with ``load_quantized``: the pre_quant_scale tensors reach
    the loaded input quantizers and the logits match the fake-quant model's. They are not bit-equal: the export
    averages the pre_quant_scale of fused siblings and re-smooths their weights (ModelOpt's export does the same), and
    AWQ's q/k/v and gate/up scales are folded into the norms."""
    import jax.numpy as jnp
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    from jaxquant.export import export_hf
    from jaxquant.export.load_quantized import load_quantized
    from jaxquant.io.safetensors import CheckpointFiles

    src = tmp_path / "src"
    make_llama128(src, "float32")
    loaded, res = _jaxquant(src, copy.deepcopy(QUANT_CFG_CHOICES[qformat]), _batches())
    ids = jnp.asarray(np.asarray(_batches()[0]))
    ref = np.asarray(loaded.model(ids, None))
    export_hf(loaded, tmp_path / "out")
    files = CheckpointFiles.open(tmp_path / "out")
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    o = back.model.model.layers[0].self_attn.o_proj
    np.testing.assert_array_equal(np.asarray(o.input_quantizer.pre_quant_scale.value),
                                  np.asarray(files.get("model.layers.0.self_attn.o_proj.pre_quant_scale")))
    np.testing.assert_array_equal(np.asarray(o.input_quantizer.pre_quant_scale.value),
                                  res.calibration_state["model.layers.0.self_attn.o_proj.input_quantizer._pre_quant_scale"])
    q = back.model.model.layers[0].self_attn.q_proj
    assert (q.input_quantizer.pre_quant_scale is None) == (qformat == "int4_awq")
    got = np.asarray(back.model(ids, None))
    plain, _ = _jaxquant(src, {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": None})
    exact = np.asarray(plain.model(ids, None))

    def err(a):
        return float(np.abs(a - exact).max() / np.abs(exact).max())

    print(f"{qformat}: relative logit error vs unquantized: fake quant {err(ref):.3f}, loaded export {err(got):.3f}")
    assert np.all(np.isfinite(got)) and err(got) < 2 * err(ref), (err(got), err(ref))

    # jaxquant check: a zero or mis-shaped pre_quant_scale is an integrity finding
    from jaxquant.check import validate_checkpoint
    from jaxquant.io.safetensors import SafetensorsFile, save_file

    f = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    t = {k: np.array(f.get(k)) for k in f.tensors}
    f.close()
    assert validate_checkpoint(tmp_path / "out").rules <= {"quant-algo-unsupported"}  # TensorRT-LLM only
    key = "model.layers.0.self_attn.o_proj.pre_quant_scale"
    for bad, rule in ((np.zeros_like(t[key]), "scale-nonpositive"), (t[key][:-1], "scale-shape")):
        save_file({**t, key: bad}, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
        assert [x.rule for x in validate_checkpoint(tmp_path / "out").findings if x.key == key] == [rule]
