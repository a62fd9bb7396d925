"""``models.walk.iter_modules`` / ``iter_variables`` yield exactly what ``nnx.iter_modules`` / ``nnx.state`` give
(paths, objects, order) on every model family jaxquant builds, after a recipe configured it, and on a user's own ``nnx.Linear`` model prepared for QAT."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxquant.models import ModelConfig, build_model
from jaxquant.models.walk import iter_modules, iter_variables

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    from test_gemma4_parity import GEMMA4_26B
    from test_moe_parity import qwen3_moe_config

    gemma4 = dict(GEMMA4_26B, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    return {
        "llama": transformers.LlamaConfig(**SMALL).to_dict() | {"architectures": ["LlamaForCausalLM"]},
        "qwen2": transformers.Qwen2Config(**SMALL, tie_word_embeddings=True).to_dict()
        | {"architectures": ["Qwen2ForCausalLM"]},
        "gemma3": transformers.Gemma3TextConfig(**SMALL, head_dim=8).to_dict()
        | {"architectures": ["Gemma3ForCausalLM"]},
        "qwen3_moe": qwen3_moe_config(num_hidden_layers=2).to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]},
        "gemma4_moe": transformers.Gemma4TextConfig(**gemma4).to_dict() | {"architectures": ["Gemma4ForCausalLM"]},
    }


def _same(model):
    ours, theirs = list(iter_modules(model)), list(nnx.iter_modules(model))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    assert all(a is b for (_, a), (_, b) in zip(ours, theirs))
    for kind in (nnx.Param, nnx.Variable, (nnx.Param, nnx.BatchStat)):
        mine = list(iter_variables(model, kind))
        flat = [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(model, kind))]
        assert [p for p, _ in mine] == [p for p, _ in flat] and flat
        assert all(a is b for (_, a), (_, b) in zip(mine, flat))
    return len(ours)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "qwen3_moe", "gemma4_moe"])
def test_same_modules_as_nnx(family):
    from jaxquant.recipe import apply_recipe

    model = build_model(ModelConfig.from_hf_config(_configs()[family]), dtype=jnp.float32, rngs=nnx.Rngs(0))
    n = _same(model)
    apply_recipe(model, "general/ptq/nvfp4_default-kv_fp8", warn=False)
    assert _same(model) == n > 20


def test_user_linears_prepared_for_qat():
    from jaxquant.qat.nnx_linear import attach_quantizers

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])
            self.head = nnx.Dict(out=nnx.Linear(8, 4, rngs=rngs))
            self.shared = self.blocks[0]  # the same module at two paths: visited once, as NNX does

    net = Net(nnx.Rngs(0))
    attach_quantizers(net)
    assert _same(net) == 1 + 2 + 4 + 4 * 3  # the net, its List and Dict, 4 linears, their 3 quantizers each
