"""Layer-by-layer perplexity (``eval/layerwise.py``) against the whole-model loss on the same model and windows:
the same token count and the same NLL (Llama bit for bit in float32; Gemma 4, whose stages fuse its tanh-GELU
differently, within float32 rounding of a sum of a few hundred terms)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.calibration import quantize
from jaxquant.cli_ptq import nll_fn
from jaxquant.eval import perplexity
from jaxquant.eval.layerwise import perplexity_layerwise
from jaxquant.models import ModelConfig, build_model

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": False}
_GEMMA4_E2B = dict(_LLAMA, architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", head_dim=8,
                   global_head_dim=16, num_hidden_layers=6, attention_k_eq_v=False, sliding_window=5,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                   final_logit_softcapping=30.0, hidden_size_per_layer_input=4, vocab_size_per_layer_input=97,
                   num_kv_shared_layers=2, use_double_wide_mlp=True, tie_word_embeddings=True,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                       "rope_theta": 1000000.0}})


@pytest.mark.parametrize("hf,exact", [(_LLAMA, True), (_GEMMA4_E2B, False)], ids=["llama", "gemma4_e2b"])
@pytest.mark.parametrize("quantized", [False, True])
def test_layerwise_perplexity_equals_the_whole_model_loss(hf, exact, quantized):
    config = ModelConfig.from_hf_config(hf)
    m = build_model(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    if quantized:  # fake-quantized stages (NVFP4 weights and inputs, FP8 KV)
        rows = rng.integers(1, 97, (4, 12)).astype(np.int32)
        quantize(m, "general/ptq/nvfp4_default-kv_fp8", rows, batch_size=2, progress=False)
    windows = rng.integers(1, 97, (5, 17)).astype(np.int32)
    whole = perplexity(None, windows, batch_size=2, loss_fn=nll_fn(m))
    staged = perplexity_layerwise(m, windows, batch_size=2)
    assert staged.n_tokens == whole.n_tokens == 5 * 16
    if exact:
        assert staged.nll_sum == whole.nll_sum
    else:
        assert staged.nll_sum == pytest.approx(whole.nll_sum, rel=1e-6)
