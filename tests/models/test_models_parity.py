"""Logits parity against transformers on tiny random configs of every dense family (fp32).

Criterion (issue 3): max |diff| <= 1e-4 * max |logit| over the unmasked positions of a left-padded batch.
"""

from __future__ import annotations

import pytest

from _hf_oracle import check_parity, make_tiny

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _check(model_cls, config, tmp_path, *, seq=24):
    return check_parity(make_tiny(model_cls, config, tmp_path), tmp_path, seq=seq)


LLAMA_CASES = {
    "default": dict(),
    "tied": dict(tie_word_embeddings=True),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "head_dim": dict(head_dim=32, attention_bias=True, mlp_bias=True),
    # NTK scaling only kicks in past max_position_embeddings (16 < the 24-token batch)
    "dynamic": dict(max_position_embeddings=16,
                    rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_parity(case, tmp_path):
    cfg = transformers.LlamaConfig(**{**BASE, **LLAMA_CASES[case]})
    _check(transformers.LlamaForCausalLM, cfg, tmp_path)


@pytest.mark.parametrize("window", [7, 200])  # shorter and longer than the 24-token sequence
def test_mistral_parity_sliding_window(window, tmp_path):
    cfg = transformers.MistralConfig(**BASE, sliding_window=window)
    loaded, _, _ = _check(transformers.MistralForCausalLM, cfg, tmp_path)
    assert loaded.config.sliding_window == window


@pytest.mark.parametrize("sliding", [False, True])
def test_qwen2_parity(sliding, tmp_path):
    extra = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1) if sliding else {}
    cfg = transformers.Qwen2Config(**BASE, tie_word_embeddings=True, **extra)
    loaded, _, _ = _check(transformers.Qwen2ForCausalLM, cfg, tmp_path)
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    assert loaded.model.model.layers[0].self_attn.o_proj.bias is None
    if sliding:
        assert loaded.config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")


def test_qwen3_parity(tmp_path):
    cfg = transformers.Qwen3Config(**BASE, head_dim=24, tie_word_embeddings=False)
    loaded, _, _ = _check(transformers.Qwen3ForCausalLM, cfg, tmp_path)
    assert loaded.model.model.layers[0].self_attn.q_norm is not None


GEMMA3 = dict(BASE, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gemma3_text_parity(softcap, tmp_path):
    cfg = transformers.Gemma3TextConfig(**GEMMA3, final_logit_softcapping=softcap)
    loaded, _, _ = _check(transformers.Gemma3ForCausalLM, cfg, tmp_path)
    c = loaded.config
    assert c.norm_offset == 1.0 and c.embed_scale == pytest.approx(8.0)
    assert c.final_logit_softcapping == softcap


def test_gemma3_text_long_window(tmp_path):
    cfg = transformers.Gemma3TextConfig(**{**GEMMA3, "sliding_window": 100})
    _check(transformers.Gemma3ForCausalLM, cfg, tmp_path)


def test_gemma3_conditional_generation(tmp_path):
    """Text stack under model.language_model.*; vision tower / projector kept as lazy extras."""
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4)
    cfg = transformers.Gemma3Config(text_config=GEMMA3, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=210, boi_token_index=208, eoi_token_index=209)
    loaded, _, _ = _check(transformers.Gemma3ForConditionalGeneration, cfg, tmp_path)
    assert loaded.config.text_prefix == "model.language_model."
    assert loaded.name_map.hf_name("model.layers.1.self_attn.k_proj.weight") == (
        "model.language_model.layers.1.self_attn.k_proj.weight")
    extras = loaded.extra_tensors
    assert extras and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in extras)
    assert "model.multi_modal_projector.mm_input_projection_weight" in extras
    assert not any(k.startswith("model.language_model.") or k.startswith("lm_head") for k in extras)
