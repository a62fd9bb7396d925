"""QAT on jaxquant's decoder: prepare_qat, training (nnx.Optimizer, nnx.jit / jax.jit, accumulation, remat),
quantizer state across all of it, finish_qat, and export of the trained model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxquant.calibration import calibration_state, quantize
from jaxquant.models import ModelConfig, build_model
from jaxquant.qat import LearnableAmax, QATQuantizer, finish_qat, loss_and_grads, make_train_step, prepare_qat
from jaxquant.quantizer import QuantAmax, TensorQuantizer
from jaxquant.quantizer.tensor_quantizer import UNCALIBRATED

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
RECIPE = "general/ptq/nvfp4_default-kv_fp8"
FP8_RECIPE = "general/ptq/fp8_default-kv_fp8"


def _model(seed=0):
    return build_model(ModelConfig.from_hf_config(LLAMA), dtype=jnp.float32, rngs=nnx.Rngs(seed))


def _batch(seed=0, b=4, s=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 97, (b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    mask[1, :5] = 0  # left padding in one row
    return ids, mask


def _amax(model):
    return {k: np.array(v) for k, v in calibration_state(model).items()}


def _q(model):
    return model.model.layers[0].self_attn.q_proj


def test_prepare_qat_is_ptq_plus_training_quantizers():
    ids, mask = _batch()
    ref, m = _model(), _model()
    quantize(ref, RECIPE, [(ids, mask)], progress=False)
    prepare_qat(m, RECIPE, [(ids, mask)])
    a, b = _amax(ref), _amax(m)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert all(isinstance(q, QATQuantizer) for _, q in nnx.iter_modules(m) if isinstance(q, TensorQuantizer))
    assert _q(m).input_quantizer.amax_mode == "static" and _q(m).input_quantizer.mode == "fake_quant"
    np.testing.assert_array_equal(np.asarray(m(ids, mask)), np.asarray(ref(ids, mask)))  # same forward bits


def test_static_amax_survives_training_with_accumulation_and_remat():
    ids, mask = _batch(b=4)
    m = _model()
    prepare_qat(m, RECIPE, [(ids, mask)])
    before = _amax(m)
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)
    assert not jax.tree.leaves(nnx.state(opt, QuantAmax))  # the optimizer holds no amax (nor moments of it)
    step = make_train_step(microbatches=2, remat=True)
    losses = [float(step(m, opt, ids, mask)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]  # it trains
    after = _amax(m)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert _q(m).input_quantizer.mode == "fake_quant"


def test_jax_jit_functional_step_keeps_quantizer_state():
    """The same with plain jax.jit over nnx.split state (no nnx transforms)."""
    ids, mask = _batch()
    m = _model()
    prepare_qat(m, FP8_RECIPE, [(ids, mask)])
    before = _amax(m)
    opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((m, opt))

    @jax.jit
    def step(state, ids, mask):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = loss_and_grads(model, ids, mask)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    losses = []
    for _ in range(5):
        state, loss = step(state, ids, mask)
        losses.append(float(loss))
    nnx.update((m, opt), state)
    assert losses[-1] < losses[0]
    after = _amax(m)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_accumulation_and_remat_give_the_full_batch_gradient():
    ids, mask = _batch(b=4)
    m = _model()
    prepare_qat(m, RECIPE, [(ids, mask)], learn_amax=True)
    wrt = nnx.Any(nnx.Param, LearnableAmax)
    l1, g1 = loss_and_grads(m, ids, mask, wrt=wrt)
    l2, g2 = loss_and_grads(m, ids, mask, wrt=wrt, microbatches=2)
    l3, g3 = loss_and_grads(m, ids, mask, wrt=wrt, microbatches=4, remat=True)
    assert jax.tree.structure(g1) == jax.tree.structure(g2) == jax.tree.structure(g3)
    amax_grads = jax.tree.leaves(nnx.State(g1).filter(LearnableAmax))
    assert amax_grads and any(float(jnp.abs(g).max()) > 0 for g in amax_grads)  # learnable amax get gradients
    for l in (l2, l3):
        np.testing.assert_allclose(float(l), float(l1), rtol=1e-6)
    for a, b, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(g3)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=2e-4, atol=1e-6)


def test_remat_alone_is_exact():
    ids, mask = _batch()
    m = _model()
    prepare_qat(m, RECIPE, [(ids, mask)])
    _, g1 = loss_and_grads(m, ids, mask)
    _, g2 = loss_and_grads(m, ids, mask, remat=True)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_learnable_amax_trains_and_finish_qat_freezes_and_unifies_it():
    ids, mask = _batch()
    m = _model()
    prepare_qat(m, RECIPE, [(ids, mask)], learn_amax="activations")
    q = _q(m)
    assert isinstance(q.input_quantizer.amax, LearnableAmax) and not isinstance(q.weight_quantizer.amax, LearnableAmax)
    wrt = nnx.Any(nnx.Param, LearnableAmax)
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=wrt)
    step = make_train_step(microbatches=2, wrt=wrt)
    w_amax = np.array(q.weight_quantizer.amax.value)
    a0 = {n: float(getattr(m.model.layers[0].self_attn, n).input_quantizer.amax.value)
          for n in ("q_proj", "k_proj", "v_proj")}
    assert len(set(a0.values())) == 1  # calibration unified the NVFP4 siblings
    for _ in range(10):
        step(m, opt, ids, mask)
    a1 = {n: float(getattr(m.model.layers[0].self_attn, n).input_quantizer.amax.value) for n in a0}
    assert a1 != a0 and len(set(a1.values())) > 1  # trained apart
    np.testing.assert_array_equal(np.array(q.weight_quantizer.amax.value), w_amax)  # weights' amax frozen
    finish_qat(m)
    amaxes = [getattr(m.model.layers[0].self_attn, n).input_quantizer.amax for n in a0]
    assert all(type(a) is QuantAmax for a in amaxes)
    assert {float(a.value) for a in amaxes} == {max(a1.values())}  # unified like the export will


def test_dynamic_quantizer_uses_max_of_the_real_tokens_of_each_call():
    from jaxquant.qat import fake_quant

    ids, mask = _batch()
    m = _model()
    prepare_qat(m, RECIPE)
    q = _q(m).input_quantizer
    assert q.amax_mode == "dynamic" and _q(m).weight_quantizer.amax_mode == "static"
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 32)) * 3
    x = x.at[1, :5].set(100.0)  # padding positions: ignored, like calibration ignores them
    amax = jnp.max(jnp.abs(x) * jnp.asarray(mask)[..., None])
    np.testing.assert_array_equal(np.asarray(q(x, token_mask=jnp.asarray(mask, bool))),
                                  np.asarray(fake_quant("nvfp4", 16, x, amax)))
    assert float(q.amax.value) == UNCALIBRATED  # nothing stored: still the placeholder of configure()


def test_dynamic_amax_trains_and_finish_qat_calibrates_it_like_ptq():
    """activation_amax='dynamic': amax = max|x| of each call (quantized upstream), no state; finish_qat then
    runs the max calibration ``quantize`` would (other quantizers off), so the model equals the PTQ one."""
    ids, mask = _batch()
    dyn, ref = _model(), _model()
    res = prepare_qat(dyn, RECIPE)
    assert res.algorithm is None
    quantize(ref, RECIPE, [(ids, mask)], progress=False)
    ids2, mask2 = _batch(seed=1)
    assert not np.array_equal(np.asarray(dyn(ids2, mask2)), np.asarray(ref(ids2, mask2)))
    _, g = loss_and_grads(dyn, ids, mask)  # straight-through gradients, amax under stop_gradient
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    with pytest.raises(Exception, match="calibration data"):
        finish_qat(dyn)
    finish_qat(dyn, [(ids, mask)])
    assert _q(dyn).input_quantizer.amax_mode == "static"
    a, b = _amax(dyn), _amax(ref)
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(np.asarray(dyn(ids2, mask2)), np.asarray(ref(ids2, mask2)))


def test_static_without_data_is_refused():
    with pytest.raises(Exception, match="calibration_data"):
        prepare_qat(_model(), RECIPE, activation_amax="static")


def test_pass_through_bwd_false_is_honoured():
    ids, mask = _batch()
    m = _model()
    recipe = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                            {"quantizer_name": "*weight_quantizer",
                             "cfg": {"num_bits": "e4m3", "axis": None, "pass_through_bwd": False}}],
              "algorithm": "max"}
    prepare_qat(m, recipe, [(ids, mask)])
    lin = _q(m)
    # shrink the weight amax so that some weights clip, then compare d loss / d W with the clip mask
    lin.weight_quantizer.amax.value = jnp.float32(0.5) * lin.weight_quantizer.amax.value
    _, g = loss_and_grads(m, ids, mask)
    gw = np.asarray(g["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].value)
    w = np.asarray(lin.weight.value)
    outside = np.abs(w) > float(lin.weight_quantizer.amax.value)
    assert outside.any() and (~outside).any()
    assert np.all(gw[outside] == 0) and np.any(gw[~outside] != 0)


def test_export_after_qat_writes_the_trained_quantized_weights(tmp_path):
    from jaxquant.converters import LoadedModel, NameMap
    from jaxquant.export import export_hf
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.numerics import nvfp4

    ids, mask = _batch()
    m = _model()
    res = prepare_qat(m, RECIPE, [(ids, mask)])
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)
    step = make_train_step()
    w_before = np.array(_q(m).weight.value)
    for _ in range(3):
        step(m, opt, ids, mask)
    finish_qat(m)
    lin = _q(m)
    assert not np.array_equal(np.array(lin.weight.value), w_before)
    cfg = m.config
    loaded = LoadedModel(m, cfg, {}, dict(LLAMA), None, NameMap.for_config(cfg))
    export_hf(loaded, tmp_path / "out", resolution=res.resolution)
    files = CheckpointFiles.open(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj"
    t = nvfp4.NVFP4Tensor(jnp.asarray(files.get(name + ".weight")), jnp.asarray(files.get(name + ".weight_scale")),
                          jnp.asarray(files.get(name + ".weight_scale_2")))
    dq = np.asarray(nvfp4.dequantize(t, jnp.float32, shape=lin.weight.value.shape))
    fq = np.asarray(lin.weight_quantizer(lin.weight.value))  # what the trained model computes with
    np.testing.assert_array_equal(dq, fq)
    np.testing.assert_array_equal(np.asarray(files.get(name + ".input_scale")),
                                  np.asarray(nvfp4.global_scale(lin.input_quantizer.amax.value)))
