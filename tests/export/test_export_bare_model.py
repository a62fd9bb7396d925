"""export_hf on a bare CausalLM (not a LoadedModel) keeps the HF names: the decoder's ``model.`` prefix and an
untied ``lm_head`` (a CausalLM has a ``.model`` attribute too, which must not be mistaken for a LoadedModel)."""

import json

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import jaxquant as jq
from jaxquant.io.safetensors import SafetensorsFile


def test_bare_causallm_export_keeps_hf_names(tmp_path):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    loaded = jq.load_hf(tmp_path / "src", dtype=np.float32)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 64, (2, 16)).astype(np.int32), "attention_mask": np.ones((2, 16), np.int32)}
    res = jq.quantize(loaded.model, jq.load_recipe("general/ptq/fp8_default-kv_fp8"), [batch], progress=False)
    hf_config = json.loads((tmp_path / "src" / "config.json").read_text())
    jq.export_hf(loaded.model, tmp_path / "out", resolution=res.resolution, hf_config=hf_config)
    names = set(SafetensorsFile(tmp_path / "out" / "model.safetensors").keys())
    assert "lm_head.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight_scale" in names
    assert "model.embed_tokens.weight" in names
