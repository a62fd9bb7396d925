"""Gemma 4 text decoder: logits parity against transformers (fp32) on tiny configs shaped like the releases.

* ``31b``: the dense Gemma-4-31B layout scaled down — ``5 x sliding + 1 x full`` layers, more KV heads of a small
  head_dim on sliding layers and fewer, wider global KV heads on full layers (``attention_k_eq_v``: no v_proj),
  proportional RoPE (``partial_rotary_factor`` 0.25) on full layers, sliding window shorter than the sequence,
  final soft-capping 30, tied embeddings, no PLE / KV sharing.
* ``26b_a4b``: the MoE layout (dense MLP + router + experts per layer, top-k of E).
* ``e2b``: the small-model features — per-layer embeddings, KV sharing, double-wide MLP.

Criterion (issue 3): max |diff| <= 1e-4 * max |logit| over the unmasked positions of a left-padded batch.
"""

from __future__ import annotations

import json

import pytest

from _hf_oracle import check_parity

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


from jaxquant.converters.names import iter_quantizers  # noqa: E402
from jaxquant.models import ModelConfig  # noqa: E402
from jaxquant.models.gemma4 import kv_sharing_modes  # noqa: E402

PATTERN = ["sliding_attention"] * 5 + ["full_attention"]

# Gemma-4-31B text config (hub): hidden 5376, 60 layers, 32 heads, 16 KV heads x 256 (sliding), 4 global KV heads
# x 512 (full), attention_k_eq_v, intermediate 21504, window 1024, soft-cap 30. Scaled: widths / 64, 2 x pattern.
GEMMA4_31B = dict(
    vocab_size=211, hidden_size=64, intermediate_size=144, num_hidden_layers=12, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    layer_types=PATTERN * 2, sliding_window=7, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
    num_kv_shared_layers=0, tie_word_embeddings=True, max_position_embeddings=128,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
)
# Gemma-4-26B-A4B: hidden 2816, 30 layers, 16 heads, 8 KV (sliding) / 2 global KV heads, k_eq_v, dense MLP 2112
# plus 128 experts of 704, top-8. Scaled down.
GEMMA4_26B = dict(GEMMA4_31B, intermediate_size=40, num_hidden_layers=6, layer_types=PATTERN, enable_moe_block=True,
                  num_experts=8, top_k_experts=3, moe_intermediate_size=24)
# E2B/E4B-style features.
GEMMA4_E2B = dict(GEMMA4_31B, num_hidden_layers=8, layer_types=["sliding_attention"] * 3 + ["full_attention"]
                  + ["sliding_attention"] * 3 + ["full_attention"], attention_k_eq_v=False,
                  num_global_key_value_heads=None, hidden_size_per_layer_input=8, vocab_size_per_layer_input=211,
                  num_kv_shared_layers=3, use_double_wide_mlp=True)

CASES = {"31b": GEMMA4_31B, "26b_a4b": GEMMA4_26B, "e2b": GEMMA4_E2B}


def make_gemma4(config, directory, *, seed=0, noise=0.2, conditional=False):
    """Random Gemma 4 (all params and the ``layer_scalar`` buffers perturbed), saved with ``save_pretrained``."""
    torch.manual_seed(seed)
    if conditional:
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2)
        # multimodal placeholder ids lie outside the vocabulary, so random text never contains them
        config = transformers.Gemma4Config(text_config=config, vision_config=vision, audio_config=None,
                                           image_token_id=1005, boi_token_id=1006, eoi_token_id=1007,
                                           video_token_id=1008, audio_token_id=1009, boa_token_id=1010)
        cls = transformers.Gemma4ForConditionalGeneration
    else:
        config = transformers.Gemma4TextConfig(**config)
        cls = transformers.Gemma4ForCausalLM
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    model.save_pretrained(directory)
    return model


def torch_logits(model, ids, mask, pos):
    # output_hidden_states disables transformers' KV-shared-layer slicing, which fails without PLE (5.24)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).logits.numpy()


def check(ref_model, directory, *, seq=24):
    return check_parity(ref_model, directory, seq=seq, logits_fn=torch_logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gemma4_text_parity(case, tmp_path):
    ref = make_gemma4(CASES[case], tmp_path)
    loaded, _, _ = check(ref, tmp_path)
    c = loaded.config
    assert c.scaling == 1.0 and c.norm_offset == 0.0 and c.final_logit_softcapping == 30.0
    assert c.embed_scale == pytest.approx(8.0)
    layers = loaded.model.model.layers
    if case == "31b":
        full, sliding = layers[5].self_attn, layers[0].self_attn
        assert (full.head_dim, full.num_kv_heads, full.v_proj) == (32, 1, None)
        assert (sliding.head_dim, sliding.num_kv_heads) == (16, 2) and sliding.v_proj is not None
        assert dict(c.rope)["full_attention"].rope_type == "proportional"
    if case == "26b_a4b":
        assert layers[0].experts.num_experts == 8 and layers[0].router.top_k == 3
        q = dict(iter_quantizers(loaded.model))
        assert "model.layers.2.router.proj.weight_quantizer" in q and "model.layers.2.mlp.up_proj.input_quantizer" in q
        assert layers[2].experts.quantizer_names("up_proj_weight_quantizer")[7] == "7.up_proj.weight_quantizer"
    if case == "e2b":
        assert kv_sharing_modes(c) == [None, None, None, "store", "store", "reuse", "reuse", "reuse"]
        assert layers[5].self_attn.k_proj is None and layers[5].mlp.gate_proj.weight.shape == (288, 64)
        assert layers[4].mlp.gate_proj.weight.shape == (144, 64)
        assert loaded.model.model.embed_tokens_per_layer.weight.shape == (211, 64)


def test_gemma4_conditional_generation(tmp_path):
    """Text stack under ``model.language_model.*``; vision tensors kept as lazy extras."""
    ref = make_gemma4(GEMMA4_26B, tmp_path, conditional=True)
    loaded, _, _ = check(ref, tmp_path)
    assert loaded.config.text_prefix == "model.language_model."
    extras = loaded.extra_tensors
    assert extras and all(k.startswith(("model.vision_tower.", "model.embed_vision.")) for k in extras)
    q = dict(iter_quantizers(loaded.model))
    assert "model.language_model.layers.0.router.proj.input_quantizer" in q


def test_gemma4_config_spellings():
    """Hub configs spell global attention with ``global_head_dim`` / ``num_global_key_value_heads``; transformers
    >= 5.2x writes ``per_layer_config``; both give the same per-layer geometry."""
    hf = transformers.Gemma4TextConfig(**GEMMA4_31B)
    saved = dict(hf.to_dict(), architectures=["Gemma4ForCausalLM"])
    assert "per_layer_config" in saved and "global_head_dim" not in saved
    hub = dict(json.loads(json.dumps(GEMMA4_31B)), architectures=["Gemma4ForCausalLM"], model_type="gemma4_text")
    a, b = ModelConfig.from_hf_config(saved), ModelConfig.from_hf_config(hub)
    assert a.extra("layer_head_dims") == b.extra("layer_head_dims") == (16,) * 5 + (32,) + (16,) * 5 + (32,)
    assert a.extra("layer_kv_heads") == b.extra("layer_kv_heads") == (2,) * 5 + (1,) + (2,) * 5 + (1,)
    # without attention_k_eq_v the global KV-head override does not apply (transformers' rule)
    c = ModelConfig.from_hf_config(dict(hub, attention_k_eq_v=False))
    assert c.extra("layer_kv_heads") == (2,) * 12 and c.extra("layer_head_dims")[5] == 32
    # defaults when keys are absent: PLE on (256), rope per layer type, last layer forced full
    d = ModelConfig.from_hf_config({"architectures": ["Gemma4ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                                    "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2,
                                    "layer_types": ["sliding_attention"] * 3})
    assert d.layer_types[-1] == "full_attention" and d.extra("hidden_size_per_layer_input") == 256
    assert dict(d.rope)["full_attention"].partial_rotary_factor == 0.25
    assert ModelConfig.from_hf_config(dict(hub, use_bidirectional_attention="vision")).family == "gemma4"
    with pytest.raises(Exception, match="bidirectional"):
        ModelConfig.from_hf_config(dict(hub, use_bidirectional_attention="all"))
