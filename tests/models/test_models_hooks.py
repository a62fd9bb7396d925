"""Quantizer call sites, jit paths and padding handling of the shared decoder (no torch needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.converters.names import NameMap, hf_param_names, iter_quantizers
from jaxquant.models import ModelConfig, build_model
from jaxquant.models.generate import generate_ids
from jaxquant.quantizer import QuantizerConfig, TensorQuantizer

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False}
FP8 = QuantizerConfig(num_bits=(4, 3))


def _model(hf=LLAMA, dtype=jnp.float32, seed=0):
    return build_model(ModelConfig.from_hf_config(hf), dtype=dtype, rngs=nnx.Rngs(seed))


def _batch(seed=0, b=3, s=10, vocab=97):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def test_paths_are_hf_names():
    m = _model()
    names = set(hf_param_names(m).values())
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert "model.norm.weight" in names and "model.layers.0.post_attention_layernorm.weight" in names
    q = dict(iter_quantizers(m))
    for site in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for kind in ("input", "weight", "output"):
            assert f"model.layers.0.self_attn.{site}.{kind}_quantizer" in q
    for site in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.1.mlp.{site}.weight_quantizer" in q
    for bmm in ("q", "k", "v"):
        assert f"model.layers.1.self_attn.{bmm}_bmm_quantizer" in q
    assert "lm_head.input_quantizer" in q
    assert m.model.layers[0].self_attn.q_proj.modelopt_class == "nn.Linear"
    # the multimodal prefix is a pure rename
    nm = NameMap(text_prefix="model.language_model.")
    assert nm.hf_name("model.layers.0.mlp.up_proj.input_quantizer") == (
        "model.language_model.layers.0.mlp.up_proj.input_quantizer")
    assert nm.nnx_path("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert nm.nnx_path("model.vision_tower.x.weight") is None


def test_disabled_quantizers_cost_nothing(monkeypatch):
    m = _model()
    ids, mask = _batch()
    graphdef, state = nnx.split(m)
    f = lambda st, i, a: nnx.merge(graphdef, st)(i, a)  # noqa: E731
    with_sites = str(jax.make_jaxpr(f)(state, ids, mask))
    monkeypatch.setattr(TensorQuantizer, "__call__", lambda self, x, token_mask=None: x)
    without = str(jax.make_jaxpr(f)(state, ids, mask))
    assert with_sites == without


def test_jit_paths_agree():
    m = _model()
    ids, mask = _batch()
    eager = m(ids, mask)
    jitted = nnx.jit(lambda mod, i, a: mod(i, a))(m, ids, mask)
    graphdef, state = nnx.split(m)
    pure = jax.jit(lambda st, i, a: nnx.merge(graphdef, st)(i, a))(state, ids, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pure), np.asarray(eager), rtol=1e-5, atol=1e-5)
    assert eager.dtype == jnp.float32 and eager.shape == (3, 10, 97)


def test_left_padding_matches_unpadded_rows():
    m = _model()
    ids, mask = _batch()
    full = np.asarray(m(ids, mask))
    for row, pads in ((1, 3), (2, 6)):
        alone = np.asarray(m(ids[row:row + 1, pads:]))
        np.testing.assert_allclose(full[row, pads:], alone[0], rtol=1e-4, atol=1e-4)


def test_calibrate_excludes_padding():
    """amax collected on a left-padded batch == amax over the same rows without padding."""
    m = _model()
    ids, mask = _batch()
    ids = ids.at[2, :6].set(5)  # pads: a token whose embedding we blow up
    m.model.embed_tokens.weight[...] = m.model.embed_tokens.weight[...].at[5].set(100.0)
    sites = [m.model.layers[0].self_attn.q_proj.input_quantizer, m.model.layers[1].self_attn.k_bmm_quantizer,
             m.model.layers[1].mlp.down_proj.input_quantizer]
    for q in sites:
        q.configure(FP8)
        q.set_mode("calibrate")
    nnx.jit(lambda mod, i, a: mod(i, a))(m, ids, mask)
    got = [float(q.amax[...]) for q in sites]
    for q in sites:
        q.configure(FP8)
        q.set_mode("calibrate")
    for row, pads in ((0, 0), (1, 3), (2, 6)):
        m(ids[row:row + 1, pads:])
    want = [float(q.amax[...]) for q in sites]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert max(got) < 100.0


def test_fake_quant_changes_output_and_has_gradient():
    pytest.importorskip("jaxquant.numerics.fp8")
    pytest.importorskip("jaxquant.numerics.nvfp4")
    m = _model()
    ids, mask = _batch()
    base = np.asarray(m(ids, mask))
    lin = m.model.layers[0].mlp.up_proj
    lin.weight_quantizer.configure(FP8, tensor_shape=lin.weight.shape)
    lin.weight_quantizer.calibrate_weight(lin.weight[...])
    lin.weight_quantizer.set_mode("fake_quant")
    fq = np.asarray(m(ids, mask))
    assert not np.allclose(fq, base)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    g = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(ids, mask) ** 2))(params)
    gw = g["model"]["layers"][0]["mlp"]["up_proj"]["weight"][...]
    assert np.isfinite(np.asarray(gw)).all() and float(jnp.abs(gw).sum()) > 0


def test_generate_greedy_matches_teacher_forced_argmax():
    """Greedy tokens == argmax of one forward over prompt + generated (causality makes them equal)."""
    m = _model()
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    out = generate_ids(m, prompts, max_new_tokens=4)
    fwd = nnx.jit(lambda mod, i: mod(i))
    for p, new in zip(prompts, out):
        assert len(new) == 4
        logits = fwd(m, jnp.asarray([list(p) + new], jnp.int32))[0]
        assert [int(t) for t in jnp.argmax(logits[len(p) - 1:-1], axis=-1)] == new


def test_nll_matches_logits():
    m = _model()
    ids, mask = _batch()
    total, n = m.nll(ids, mask, chunk=7)
    lg = np.asarray(m(ids, mask), np.float64)
    lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    tgt = np.asarray(ids)[:, 1:]
    valid = (np.asarray(mask)[:, 1:] * np.asarray(mask)[:, :-1]).astype(bool)
    ref = -np.take_along_axis(lp[:, :-1], tgt[..., None], -1)[..., 0][valid].sum()
    assert int(n) == valid.sum()
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)


def test_bf16_model_runs():
    m = _model(dtype=jnp.bfloat16)
    ids, mask = _batch()
    out = m(ids, mask)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    assert m.model.layers[0].self_attn.q_proj.weight[...].dtype == jnp.bfloat16
