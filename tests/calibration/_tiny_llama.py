"""A tiny HF Llama written to disk for the calibration oracles (mse, local_hessian, gptq, ...): import it as
``from _tiny_llama import write_llama`` (this folder is on ``sys.path`` under pytest's prepend import mode; a plain
module, since ``import conftest`` finds whichever of the suite's conftest files was collected last)."""

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


def two_masked_batches():
    """Two calibration batches of 2 x 16 token ids in [1, 101) from a fixed seed, the first row's first 5 positions
    masked (``(ids, mask)`` pairs, numpy int32)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 101, (4, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    return [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
