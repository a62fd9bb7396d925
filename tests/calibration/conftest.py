"""Fixtures shared by the calibration tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def write_llama(tmp_path_factory, name: str, *, layers: int, max_pos: int, heavy: bool = True):
    """A tiny HF Llama (hidden 64, MLP 96, 4 heads / 2 KV heads, vocabulary 128) saved under a fresh ``name`` folder;
    ``heavy``: projection weights made heavy-tailed (where weight searches move the amax). ``(model, dir)``."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from _hf_oracle import make_tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp(name)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos)
    model = make_tiny(LlamaForCausalLM, cfg, d)
    if heavy:
        torch.manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("proj.weight"):
                    p.mul_(torch.distributions.StudentT(2.5).sample(p.shape).clamp(-30, 30).abs() ** 0.5)
        model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A one-layer HF Llama with heavy-tailed projection weights, saved to disk."""
    return write_llama(tmp_path_factory, "lh_llama", layers=1, max_pos=64)
