"""Logits parity against transformers on tiny random configs of every dense family (fp32).

Criterion (issue 3): max |diff| <= 1e-4 * max |logit| over the unmasked positions of a left-padded batch.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from _hf_oracle import inputs, jax_logits, make_tiny, rel_diff, torch_logits
from jaxquant.converters import load_hf

transformers = pytest.importorskip("transformers")

TOL = 1e-4
BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _check(model_cls, config, tmp_path, *, seq=24):
    ref_model = make_tiny(model_cls, config, tmp_path)
    loaded = load_hf(tmp_path, dtype=jnp.float32)
    ids, mask, pos = inputs(loaded.config.vocab_size, seq=seq)
    ref = torch_logits(ref_model, ids, mask, pos)
    ours = jax_logits(loaded.model, ids, mask)
    diff, top = rel_diff(ours, ref, mask)
    assert diff <= TOL * top, f"max diff {diff:.3g} vs max logit {top:.3g}"
    return loaded, diff, top


LLAMA_CASES = {
    "default": dict(),
    "tied": dict(tie_word_embeddings=True),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "head_dim": dict(head_dim=32, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_parity(case, tmp_path):
    cfg = transformers.LlamaConfig(**{**BASE, **LLAMA_CASES[case]})
    _check(transformers.LlamaForCausalLM, cfg, tmp_path)
