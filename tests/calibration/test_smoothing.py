"""SmoothQuant / AWQ-lite on jaxquant's own models: the drivers agree, the state reloads, MoE is refused."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.calibration import calibration_state, load_calibration_state, quantize
from jaxquant.calibration.max import set_quant_mode
from jaxquant.errors import UnsupportedError
from jaxquant.models import ModelConfig, build_model
from jaxquant.recipe import apply_recipe
from _tiny_llama import two_masked_batches  # noqa: E402

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 101,
             "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4,
             "num_experts_per_tok": 2, "norm_topk_prob": True, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}


def _cfg(weight, inp, algorithm):
    q = [{"quantizer_name": "*", "enable": False}, {"quantizer_name": "*weight_quantizer", "cfg": weight}]
    q.append({"quantizer_name": "*input_quantizer", **({"cfg": inp} if inp else {"enable": False})})
    q.append({"quantizer_name": "*lm_head*", "enable": False})
    return {"quant_cfg": q, "algorithm": algorithm}


INT8_SQ = _cfg({"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}, {"method": "smoothquant", "alpha": 0.5})
INT4_AWQ = _cfg({"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}}, None, {"method": "awq_lite"})


def _model(hf=LLAMA):
    return build_model(ModelConfig.from_hf_config(hf), dtype=jnp.float32, rngs=nnx.Rngs(0))


def _data():
    return two_masked_batches()


def test_smoothquant_layerwise_equals_batch_by_batch():
    a, b = _model(), _model()
    ra = quantize(a, INT8_SQ, _data(), progress=False)
    quantize(b, INT8_SQ, _data()[:1], progress=False)  # an earlier run's scales must not leak into the next one
    rb = quantize(b, INT8_SQ, _data(), progress=False, layerwise=True)
    assert sorted(ra.calibration_state) == sorted(rb.calibration_state)
    assert any(k.endswith("input_quantizer._pre_quant_scale") for k in ra.calibration_state)
    for k, v in ra.calibration_state.items():
        np.testing.assert_array_equal(v, rb.calibration_state[k], err_msg=k)


@pytest.mark.parametrize("cfg", [INT8_SQ, INT4_AWQ], ids=["smoothquant", "awq_lite"])
def test_state_reloads_into_a_fresh_model(cfg):
    """The state alone (no weight was rewritten) reproduces the calibrated model's logits bit for bit."""
    m = _model()
    res = quantize(m, cfg, _data(), progress=False)
    ids, mask = (jnp.asarray(x) for x in _data()[0])
    ref = np.asarray(m(ids, mask))
    pqs = [k for k in res.calibration_state if k.endswith("._pre_quant_scale")]
    assert len(pqs) == 2 * 14  # input and weight side of 7 linears x 2 layers (W4A16's input quantizer is disabled)
    fresh = _model()
    apply_recipe(fresh, cfg, warn=False)
    load_calibration_state(fresh, res.calibration_state)
    set_quant_mode(fresh, "fake_quant")
    np.testing.assert_array_equal(np.asarray(fresh(ids, mask)), ref)
    assert set(calibration_state(fresh)) == set(res.calibration_state)
    # without the smoothing the model computes something else
    unsmoothed = {k: v for k, v in res.calibration_state.items() if not k.endswith("._pre_quant_scale")}
    load_calibration_state(fresh, unsmoothed)
    assert not np.array_equal(np.asarray(fresh(ids, mask)), ref)


def test_awq_alphas_are_on_modelopts_grid():
    from jaxquant.calibration.awq import alpha_grid

    res = quantize(_model(), INT4_AWQ, _data(), progress=False)
    assert len(res.stats.awq_alphas) == 14 and set(res.stats.awq_alphas.values()) <= set(alpha_grid(0.1))
    assert alpha_grid(0.1)[9] == 0.8999999761581421 and len(alpha_grid(0.1)) == 11 and alpha_grid(1.0) == (0.0, 1.0)


def test_smoothing_refuses_stacked_experts():
    cfg = _cfg({"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}, "smoothquant")
    cfg["quant_cfg"].append({"quantizer_name": "*mlp.gate*", "enable": False})
    with pytest.raises(UnsupportedError, match="stacked MoE experts"):
        quantize(_model(QWEN3_MOE), cfg, _data(), progress=False)
