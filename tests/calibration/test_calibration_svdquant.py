"""``svdquant`` (the ``nvfp4_svdquant`` preset): the low-rank factors against an independent float64 SVD of the
AWQ-smoothed weight, the residual and the forward's branch, the calibration state round trip, the options, and the
whole preset against nvidia-modelopt 0.47's ``mtq.quantize`` on CPU (tiny HF Llama, float32, NVFP4 kernels emulated
as in ``test_calibration_local_hessian``)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.calibration import calibration_state, load_calibration_state, quantize
from jaxquant.calibration.algorithms import resolve_algorithm
from jaxquant.calibration.max import set_quant_mode
from jaxquant.calibration.svdquant import svd_factors
from jaxquant.errors import CheckpointError, RecipeError, UnsupportedError
from jaxquant.quantizer.lowrank import QuantLowRank, lowrank_product
from jaxquant.models import ModelConfig, build_model
from jaxquant.recipe import apply_recipe
from jaxquant.recipe.presets import preset_recipe
from _tiny_llama import two_masked_batches  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _model(dtype):
    return build_model(ModelConfig.from_hf_config(LLAMA), dtype=dtype, rngs=nnx.Rngs(0))


def _data():
    return two_masked_batches()


def _round(x, dtype) -> np.ndarray:
    """float64 -> float32 -> ``dtype`` (torch's ``.to`` of a float64 tensor), as float64."""
    return np.asarray(jnp.asarray(np.asarray(x, np.float32)).astype(dtype).astype(jnp.float32), np.float64)


def _linear(m, name):
    mod = m.model.layers[0]
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


@pytest.fixture(scope="module", params=[jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def calibrated(request):
    m = _model(request.param)
    res = quantize(m, preset_recipe("nvfp4_svdquant", "none"), _data(), progress=False)
    return m, res, request.param


def test_options():
    algo, opts = resolve_algorithm({"method": "svdquant", "lowrank": 8, "skip_layers": ["*o_proj"]})
    assert algo.name == "svdquant" and opts == {"lowrank": 8, "skip_layers": ("*o_proj",)}
    assert resolve_algorithm({"method": "svdquant"})[1]["lowrank"] == 32  # SVDQuantConfig's default
    for bad, err in (({"lowrank": 0}, RecipeError), ({"lowrank": 2.5}, RecipeError), ({"alpha_step": 0.5},
                     UnsupportedError), ({"skip_layers": "*o_proj"}, RecipeError),
                     ({"layerwise": {"enable": True}}, UnsupportedError)):
        with pytest.raises(err):
            resolve_algorithm({"method": "svdquant", **bad})


def test_factors_equal_float64_svd_of_smoothed_weight(calibrated):
    """Per linear: the smoothed weight rebuilt from the source weight and the AWQ scale, its float64 SVD (numpy,
    thin), and the factors, the residual the quantizer sees and the weight amax that follow from it."""
    m, res, dtype = calibrated
    state = res.calibration_state
    top = {}
    for name in LINEARS:
        lin, key = _linear(m, name), f"model.layers.0.{name}.weight_quantizer"
        w = np.asarray(jnp.asarray(lin.weight[...]).astype(jnp.float32), np.float64)
        inv = state[key + "._pre_quant_scale"]  # 1 / p, float32
        ws = _round(w.astype(np.float32) * inv[None, :], dtype)
        u, s, vt = np.linalg.svd(ws, full_matrices=False)
        a, b = state[key + "._svdquant_lora_a"], state[key + "._svdquant_lora_b"]
        assert a.shape == (32, ws.shape[1]) and b.shape == (ws.shape[0], 32)
        sign = np.sign(np.sum(a * vt[:32], axis=1))  # an SVD fixes each component up to its sign
        np.testing.assert_array_equal(a, _round(sign[:, None] * vt[:32], dtype), err_msg=name)
        np.testing.assert_array_equal(b, _round(u[:, :32] * s[:32] * sign[None, :], dtype), err_msg=name)
        # the product: within float32 summation error (32 terms) plus one rounding of the exact float64 product
        exact = b.astype(np.float64) @ a.astype(np.float64)
        prod = np.asarray(lowrank_product(a, b, dtype).astype(jnp.float32), np.float64)
        tol = 32 * np.finfo(np.float32).eps * (np.abs(b) @ np.abs(a)) + float(jnp.finfo(dtype).eps) * np.abs(exact)
        assert np.all(np.abs(prod - exact) <= tol), name
        # the residual the quantizer sees: the difference rounded once
        got = np.asarray(jnp.asarray(lin.weight_quantizer.scaled(lin.weight[...])).astype(jnp.float32))
        np.testing.assert_array_equal(got, _round(ws - prod, dtype), err_msg=name)
        top[name] = float(np.abs(got).max())
        assert np.linalg.norm(got) < 0.9 * np.linalg.norm(ws)  # the branch took the top directions
    for group in FUSED:  # max calibration of the residuals; finalize gives fused siblings the max of theirs
        for name in group:
            want = max(top[n] for n in group)
            assert float(state[f"model.layers.0.{name}.weight_quantizer._amax"]) == want, name


def test_forward_adds_the_branch(calibrated):
    """The fake-quant linear is ``Q(x p) @ Q(R)^T + ((x p) @ a^T) @ b^T``."""
    from jaxquant.quantizer.tensor_quantizer import fake_quant_ste

    m, res, dtype = calibrated
    lin = _linear(m, "mlp.down_proj")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 96)), dtype)
    xs = lin.input_quantizer.scaled(x)
    iq, wq = lin.input_quantizer, lin.weight_quantizer
    xq = fake_quant_ste(iq.config.format, iq.block_size, xs, iq.amax.value, None)
    wres = wq.scaled(lin.weight[...])
    wqd = fake_quant_ste(wq.config.format, wq.block_size, wres, wq.amax.value, None)
    a, b = (jnp.asarray(v.value).astype(dtype) for v in (wq.svdquant_lora_a, wq.svdquant_lora_b))
    want = lin.matmul(xq, wqd) + lin.matmul(lin.matmul(xs, a), b)
    np.testing.assert_array_equal(np.asarray(lin(x).astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_gradients_reach_weight_and_factors(calibrated):
    """QAT: the weight's gradient passes the residual's roundings (straight through) and the fake quant (STE), so it
    is the plain linear's gradient ``g^T Q(x p)`` rounded once; the factors get theirs through the branch and the
    residual."""
    import jax

    m, res, dtype = calibrated
    lin = _linear(m, "mlp.up_proj")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 64)), dtype)
    wq = lin.weight_quantizer
    graphdef, params, lowrank, rest = nnx.split(lin, nnx.Param, QuantLowRank, ...)

    def loss(params, lowrank):
        return jnp.sum(nnx.merge(graphdef, params, lowrank, rest)(x).astype(jnp.float32))

    gp, gl = (nnx.to_pure_dict(g) for g in jax.grad(loss, argnums=(0, 1))(params, lowrank))
    gw = gp["weight"]
    ga, gb = (gl["weight_quantizer"][k] for k in ("svdquant_lora_a", "svdquant_lora_b"))
    iq = lin.input_quantizer
    xq = iq(x)  # fake quant of the pre-scaled input (mode fake_quant)
    want = np.asarray(jnp.sum(xq.astype(jnp.float32), axis=0))[None, :] * np.asarray(wq.pre_quant_scale.value)
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.broadcast_to(want, gw.shape), rtol=1e-2)
    assert np.abs(np.asarray(ga)).max() > 0 and np.abs(np.asarray(gb)).max() > 0


def test_state_reloads_into_a_fresh_model(calibrated):
    m, res, dtype = calibrated
    ids, mask = (jnp.asarray(x) for x in _data()[0])
    ref = np.asarray(m(ids, mask).astype(jnp.float32))
    assert sum(k.endswith("_svdquant_lora_a") for k in res.calibration_state) == 7
    fresh = _model(dtype)
    apply_recipe(fresh, preset_recipe("nvfp4_svdquant", "none"), warn=False)
    load_calibration_state(fresh, res.calibration_state)
    set_quant_mode(fresh, "fake_quant")
    np.testing.assert_array_equal(np.asarray(fresh(ids, mask).astype(jnp.float32)), ref)
    assert set(calibration_state(fresh)) == set(res.calibration_state)
    bad = dict(res.calibration_state)
    for k in [k for k in bad if "lora" in k]:  # without the factors the model computes something else
        bad.pop(k)
    load_calibration_state(fresh, bad)
    assert not np.array_equal(np.asarray(fresh(ids, mask).astype(jnp.float32)), ref)
    bad = dict(res.calibration_state)
    bad.pop("model.layers.0.mlp.up_proj.weight_quantizer._svdquant_lora_b")
    with pytest.raises(CheckpointError, match="up_proj"):
        load_calibration_state(fresh, bad)


def test_skip_layers_and_rank_padding():
    """``skip_layers``: no smoothing and no branch, max calibration only; a rank above ``min(out, in)`` pads."""
    m = _model(jnp.float32)
    recipe = preset_recipe("nvfp4_svdquant", "none")
    cfg = recipe.quantize_config()
    cfg["algorithm"] = {"method": "svdquant", "lowrank": 40, "skip_layers": ["*o_proj"]}
    with pytest.warns(UserWarning, match="zero-padded"):
        res = quantize(m, cfg, _data(), progress=False)
    st = res.calibration_state
    o = "model.layers.0.self_attn.o_proj"
    assert not any(k.startswith(o) and ("lora" in k or "pre_quant" in k) for k in st)
    w = np.asarray(_linear(m, "self_attn.o_proj").weight[...])
    assert float(st[o + ".weight_quantizer._amax"]) == float(np.abs(w).max())
    a = st["model.layers.0.self_attn.k_proj.weight_quantizer._svdquant_lora_a"]  # k_proj is [32, 64]
    assert a.shape == (40, 64) and not a[32:].any()


def test_svd_helper_equals_modelopts():
    """``svd_factors`` against ModelOpt's own ``svd`` helper (``model_calib.svd``) and its in-place weight update
    ``W -= lora_b @ lora_a`` on a bfloat16 weight (torch)."""
    torch = pytest.importorskip("torch")
    from modelopt.torch.quantization.model_calib import svd

    from jaxquant.quantizer.lowrank import lowrank_residual

    rng = np.random.default_rng(5)
    w = (rng.standard_t(3, size=(96, 64)) * 0.05).astype(np.float32)
    for tdt, jdt in ((torch.bfloat16, jnp.bfloat16), (torch.float32, jnp.float32)):
        wt = torch.from_numpy(w).to(tdt)
        us, vt = svd(wt, 16)
        a, b = svd_factors(jnp.asarray(w).astype(jdt), 16)
        sign = np.sign(np.sum(a * vt.float().numpy(), axis=1))
        np.testing.assert_array_equal(a * sign[:, None], vt.float().numpy())
        np.testing.assert_array_equal(b * sign[None, :], us.float().numpy())
        ref = (wt - us @ vt).float().numpy()
        got = np.asarray(lowrank_residual(jnp.asarray(w).astype(jdt), a, b).astype(jnp.float32))
        if jdt == jnp.bfloat16:
            np.testing.assert_array_equal(got, ref)
        else:  # torch's float32 GEMM vs XLA's: the same product up to float32 summation order
            np.testing.assert_allclose(got, ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(w).max())


def test_preset_equals_modelopt(tiny_llama, monkeypatch):
    """The whole ``nvfp4_svdquant`` preset against ModelOpt's ``mtq.quantize`` (its ``SVDQuantLinear``s, float32 on
    CPU): the AWQ scales agree to the last bit or so (``awq_lite``'s documented float32 ``pow`` ulp), and so, to
    float32 precision, do the low-rank products ``lora_b @ lora_a`` (a product, since each factor is fixed up to
    sign), the residual weights, and the weight and input amax (q/k/v and gate/up: the max of ModelOpt's, as its
    export unifies them)."""
    from test_calibration_local_hessian import _dynamic_kernel_on_cpu, _ids, _modelopt

    from jaxquant.converters import load_hf

    _dynamic_kernel_on_cpu(monkeypatch)
    recipe = preset_recipe("nvfp4_svdquant", "none")
    tmodel, d = tiny_llama
    ids = _ids()
    mods = dict(_modelopt(tmodel, recipe.quantize_config(), ids).named_modules())
    loaded = load_hf(d, dtype=jnp.float32)
    batches = [(ids[i:i + 2].astype(np.int32), np.ones((2, 16), np.int32)) for i in range(0, len(ids), 2)]
    res = quantize(loaded.model, recipe, batches, progress=False)
    st = res.calibration_state
    for group in FUSED:
        names = [f"model.layers.0.{p}" for p in group]
        assert all(type(mods[n]).__name__.startswith("SVDQuant") for n in names)
        want_w = max(float(mods[n].weight_quantizer._amax) for n in names)
        want_in = max(float(mods[n].input_quantizer._amax) for n in names)
        for n in names:
            wq, iq = mods[n].weight_quantizer, mods[n].input_quantizer
            np.testing.assert_allclose(st[f"{n}.input_quantizer._pre_quant_scale"],
                                       iq._pre_quant_scale.float().numpy(), rtol=1e-6, err_msg=n)
            theirs = wq.svdquant_lora_b.double().numpy() @ wq.svdquant_lora_a.double().numpy()
            ours = st[f"{n}.weight_quantizer._svdquant_lora_b"].astype(np.float64) @ \
                st[f"{n}.weight_quantizer._svdquant_lora_a"].astype(np.float64)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max(), err_msg=n)
            lin = loaded.model.model.layers[0]
            for part in n.split(".")[3:]:
                lin = getattr(lin, part)
            resid = np.asarray(lin.weight_quantizer.scaled(lin.weight[...]))
            theirs_w = mods[n].weight.detach().float().numpy()
            scale = np.abs(theirs_w + theirs).max()  # the smoothed weight's: the residual's errors are the product's
            np.testing.assert_allclose(resid, theirs_w, rtol=0, atol=1e-6 * scale, err_msg=n)
            np.testing.assert_allclose(st[f"{n}.weight_quantizer._amax"], want_w, rtol=1e-6, err_msg=n)
            np.testing.assert_allclose(st[f"{n}.input_quantizer._amax"], want_in, rtol=1e-6, err_msg=n)
