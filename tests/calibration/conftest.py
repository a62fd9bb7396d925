"""Fixtures shared by the calibration tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A one-layer HF Llama with heavy-tailed projection weights, saved to disk."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from _hf_oracle import make_tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("lh_llama")
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = make_tiny(LlamaForCausalLM, cfg, d)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.weight"):
                p.mul_(torch.distributions.StudentT(2.5).sample(p.shape).clamp(-30, 30).abs() ** 0.5)
    model.save_pretrained(d)
    return model, d
