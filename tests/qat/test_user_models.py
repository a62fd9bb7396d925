"""QAT of users' own models: a Flax NNX model built from nnx.Linear (kernel [in, out]) and a Linen model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxquant.calibration import calibration_state
from jaxquant.numerics import fp8, nvfp4
from jaxquant.qat import LinenQAT, QuantizedLinear, attach_quantizers, make_train_step, prepare_qat
from jaxquant.quantizer import QuantAmax

RECIPE = "general/ptq/nvfp4_default-kv_fp8"
D = 32
# the recipe's KV-cache rule has nothing to match in these models
pytestmark = pytest.mark.filterwarnings("ignore::jaxquant.recipe.UnmatchedRuleWarning")


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.up_proj = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down_proj = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down_proj(jax.nn.gelu(self.up_proj(self.norm(x))))


class Net(nnx.Module):
    """A small regressor: blocks run under nnx.remat, a head that the recipe leaves unquantized."""

    def __init__(self, rngs, remat=False):
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(D, 8, rngs=rngs)
        self.remat = remat

    def __call__(self, x):
        for b in self.blocks:
            x = nnx.remat(lambda blk, h: blk(h))(b, x) if self.remat else b(x)
        return self.lm_head(x)


def _data(n=4, seed=0):
    k = jax.random.PRNGKey(seed)
    xs = [jax.random.normal(jax.random.fold_in(k, i), (16, D)) for i in range(n)]
    w = jax.random.normal(jax.random.fold_in(k, 99), (D, 8)) / np.sqrt(D)
    return xs, [jnp.tanh(x @ w) for x in xs]


def _mse(model, x, y):
    return jnp.sum((model(x) - y) ** 2), jnp.asarray(y.size, jnp.int32)


def test_attach_quantizers_keeps_paths_params_and_outputs():
    net = Net(nnx.Rngs(0))
    x = _data()[0][0]
    before = np.asarray(net(x))
    params = jax.tree.map(np.asarray, nnx.state(net, nnx.Param))
    paths = attach_quantizers(net)
    assert paths == ["blocks.0.down_proj", "blocks.0.up_proj", "blocks.1.down_proj", "blocks.1.up_proj", "lm_head"]
    assert isinstance(net.blocks[0].up_proj, QuantizedLinear) and isinstance(net.blocks[0].up_proj, nnx.Linear)
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, nnx.state(net, nnx.Param)))
    np.testing.assert_array_equal(np.asarray(net(x)), before)  # quantizers disabled: the same function
    assert attach_quantizers(net) == []


def test_nvfp4_weights_are_quantized_along_the_input_features():
    net = Net(nnx.Rngs(0))
    xs, _ = _data()
    res = prepare_qat(net, RECIPE, lambda m: [m(x) for x in xs])
    assert res.resolution.configs["blocks.0.up_proj.weight_quantizer"].format == "nvfp4"
    assert res.resolution.configs["lm_head.weight_quantizer"] is None  # ModelOpt's default: no lm_head
    lin = net.blocks[0].up_proj
    k = lin.kernel.value  # [in, out]
    w_amax = float(lin.weight_quantizer.amax.value)
    assert w_amax == float(jnp.max(jnp.abs(k)))  # max calibration of the weight
    x = net.blocks[0].norm(xs[0])
    a_amax = lin.input_quantizer.amax.value
    assert float(a_amax) > 0
    # reference: blocks of 16 along `in` = kernel axis 0 = the last axis of kernel.T ([out, in], torch's layout)
    wq = nvfp4.fake_quant_dynamic(k.T, w_amax).T
    xq = nvfp4.fake_quant_dynamic(x, a_amax)
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(xq @ wq + lin.bias.value))
    assert not np.array_equal(np.asarray(wq), np.asarray(nvfp4.fake_quant_dynamic(k, w_amax)))  # the axis matters


def test_per_channel_fp8_is_per_output_feature():
    net = Net(nnx.Rngs(1))
    recipe = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                            {"quantizer_name": "*up_proj.weight_quantizer", "cfg": {"num_bits": "e4m3", "axis": 0}}],
              "algorithm": "max"}
    prepare_qat(net, recipe)
    lin = net.blocks[0].up_proj
    k = lin.kernel.value
    amax = lin.weight_quantizer.amax.value
    assert amax.shape == (2 * D, 1)
    np.testing.assert_array_equal(np.asarray(amax[:, 0]), np.asarray(jnp.max(jnp.abs(k), axis=0)))
    x = jnp.ones((2, D))
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(x @ fp8.fake_quant(k.T, amax).T + lin.bias.value))


def test_straight_through_gradient_of_a_quantized_linear_by_hand():
    """d/dW sum(c * (q(x) @ q(W) + b)) = q(x)^T c and d/dx = c q(W)^T: the STE passes the cotangent
    through both quantizers unchanged (pass_through_bwd: true)."""
    net = Net(nnx.Rngs(2))
    xs, _ = _data()
    prepare_qat(net, RECIPE, lambda m: [m(x) for x in xs])
    lin = net.blocks[1].down_proj
    x = jax.random.normal(jax.random.PRNGKey(5), (8, 2 * D))
    c = jax.random.normal(jax.random.PRNGKey(6), (8, D))
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs: compare with float64 products
        gk, gx = nnx.grad(lambda m, v: jnp.sum(m(v) * c), argnums=(0, 1))(lin, x)
    xq = np.asarray(lin.input_quantizer(x), np.float64)
    wq = np.asarray(lin.weight_quantizer(lin.kernel.value.T).T, np.float64)
    np.testing.assert_allclose(np.asarray(gk["kernel"].value), xq.T @ np.asarray(c, np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(c, np.float64) @ wq.T, rtol=1e-5, atol=1e-5)


def test_nnx_user_model_trains_under_remat_with_state_intact():
    net = Net(nnx.Rngs(3), remat=True)
    xs, ys = _data()
    prepare_qat(net, RECIPE, lambda m: [m(x) for x in xs])
    before = {k: np.array(v) for k, v in calibration_state(net).items()}
    assert before
    opt = nnx.Optimizer(net, optax.adam(3e-3), wrt=nnx.Param)
    assert not jax.tree.leaves(nnx.state(opt, QuantAmax))
    step = make_train_step(loss_fn=_mse, microbatches=2)
    x, y = jnp.concatenate(xs), jnp.concatenate(ys)
    losses = [float(step(net, opt, x, y)) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    after = calibration_state(net)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


# --------------------------------------------------------------------------------------------- Linen
class LinenNet(nn.Module):
    qat: LinenQAT | None = None

    @nn.compact
    def __call__(self, x):
        dg = self.qat.dot_general if self.qat is not None else (lambda name: jax.lax.dot_general)
        h = nn.Dense(2 * D, name="up_proj", dot_general=dg("up_proj"))(x)
        h = nn.Dense(D, name="down_proj", dot_general=dg("down_proj"))(jax.nn.gelu(h))
        return nn.Dense(8, name="lm_head", dot_general=dg("lm_head"))(h)


def test_linen_params_transform_and_dot_general():
    xs, ys = _data()
    params = LinenNet().init(jax.random.PRNGKey(0), xs[0])["params"]
    qat = LinenQAT(RECIPE, {"params": params})
    assert set(qat.weights) == {"up_proj", "down_proj"}  # lm_head excluded by the recipe
    assert qat.resolution.configs["up_proj.input_quantizer"].format == "nvfp4"
    qp = qat.fake_quant_params(params)
    k = params["up_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(qp["up_proj"]["kernel"]),
                                  np.asarray(nvfp4.fake_quant_dynamic(k.T, jnp.max(jnp.abs(k))).T))
    np.testing.assert_array_equal(np.asarray(qp["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))
    assert qat.dot_general("lm_head") is jax.lax.dot_general
    model = LinenNet(qat)
    x = xs[0]
    h = nvfp4.fake_quant_dynamic(x, jnp.max(jnp.abs(x))) @ qp["up_proj"]["kernel"] + qp["up_proj"]["bias"]
    out = model.apply({"params": qp}, x)
    h2 = jax.nn.gelu(h)
    h2 = nvfp4.fake_quant_dynamic(h2, jnp.max(jnp.abs(h2))) @ qp["down_proj"]["kernel"] + qp["down_proj"]["bias"]
    ref = h2 @ qp["lm_head"]["kernel"] + qp["lm_head"]["bias"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_linen_qat_trains_with_optax():
    xs, ys = _data()
    params = LinenNet().init(jax.random.PRNGKey(1), xs[0])["params"]
    qat = LinenQAT(RECIPE, params)
    model = LinenNet(qat)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    x, y = jnp.concatenate(xs), jnp.concatenate(ys)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": qat.fake_quant_params(p)}, x) - y) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_user_nnx_model_exports_from_its_quantizer_sites(tmp_path):
    """export_hf works from quantizer sites, not model classes: a user's nnx.Linear model trained with QAT exports
    each linear as torch's ``weight [out, in]`` (= kernel.T) with the NVFP4 tensors ModelOpt's formulas give for it
    (the numpy oracle, itself byte-checked against nvidia-modelopt), and its other parameters under their NNX paths."""
    import json
    import sys
    from pathlib import Path

    from jaxquant.export import export_hf
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.qat import finish_qat

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    import _numpy_export_ref as ref

    net = Net(nnx.Rngs(3))
    xs, ys = _data()
    res = prepare_qat(net, RECIPE, lambda m: [m(x) for x in xs])
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)
    step = make_train_step(loss_fn=_mse)
    for x, y in zip(xs, ys):
        step(net, opt, x, y)
    finish_qat(net)
    summary = export_hf(net, tmp_path / "out", resolution=res.resolution,
                        hf_config={"architectures": ["Net"], "model_type": "user_net"})
    files = CheckpointFiles.open(tmp_path / "out")
    names = set(files.keys())
    assert not any(n.endswith(".kernel") for n in names)
    for b in range(2):
        for proj in ("up_proj", "down_proj"):
            lin = getattr(net.blocks[b], proj)
            name = f"blocks.{b}.{proj}"
            w = np.asarray(lin.kernel.value).T
            q, scale, scale_2 = ref.nvfp4_weight(w, np.float32(lin.weight_quantizer.amax.value))
            assert files.get(name + ".weight").tobytes() == q.tobytes() and tuple(files.tensor_info(name + ".weight").shape) == q.shape
            assert np.asarray(files.get(name + ".weight_scale")).tobytes() == scale.tobytes()
            assert np.asarray(files.get(name + ".weight_scale_2")).tobytes() == scale_2.tobytes()
            in_scale = ref.nvfp4_input_scale(np.float32(lin.input_quantizer.amax.value))
            assert np.asarray(files.get(name + ".input_scale")).tobytes() == in_scale.tobytes()
            np.testing.assert_array_equal(files.get(name + ".bias"), np.asarray(lin.bias.value))
    np.testing.assert_array_equal(files.get("lm_head.weight"), np.asarray(net.lm_head.kernel.value).T)  # unquantized
    np.testing.assert_array_equal(files.get("blocks.0.norm.scale"), np.asarray(net.blocks[0].norm.scale.value))
    hfq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert hfq["quant_algo"] == "NVFP4" and "lm_head" in hfq["exclude_modules"]
    assert summary.hf_quant_config["quantization"]["quant_algo"] == "NVFP4"
