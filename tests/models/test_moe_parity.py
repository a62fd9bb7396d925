"""Mixtral and Qwen3-MoE: logits parity against transformers (fp32) and the checkpoint layouts they load from.

Criterion (issue 3): max |diff| <= 1e-4 * max |logit| over the unmasked positions of a left-padded batch.
Checkpoints are read both in the hub's per-expert layout (what ``save_pretrained`` writes) and in the
transformers-5 fused layout (``experts.gate_up_proj [E, 2I, H]``, Mixtral under ``mlp``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from _hf_oracle import check_parity as check
from _hf_oracle import inputs, make_tiny

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.converters.names import iter_quantizers  # noqa: E402
from jaxquant.models.moe import MoeExperts, SparseMoeBlock  # noqa: E402

BASE = dict(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)


def mixtral_config(**kw):
    return transformers.MixtralConfig(**{**BASE, "intermediate_size": 48, "num_local_experts": 6,
                                         "num_experts_per_tok": 2, **kw})


def qwen3_moe_config(**kw):
    return transformers.Qwen3MoeConfig(**{**BASE, "intermediate_size": 80, "moe_intermediate_size": 32,
                                          "head_dim": 24, "num_experts": 7, "num_experts_per_tok": 3,
                                          "norm_topk_prob": True, **kw})


def save_fused(model, directory):
    """Rewrite ``directory``'s weights with transformers-5 module names (fused experts, Mixtral ``mlp``)."""
    from safetensors.numpy import save_file

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    for f in directory.glob("*.safetensors"):
        f.unlink()
    idx = directory / "model.safetensors.index.json"
    if idx.exists():
        idx.unlink()
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return sd


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_mixtral_parity(layout, tmp_path):
    ref = make_tiny(transformers.MixtralForCausalLM, mixtral_config(), tmp_path)
    keys = json.dumps(sorted(_keys(tmp_path)))
    assert "block_sparse_moe.experts.0.w1.weight" in keys  # save_pretrained writes the hub layout
    if layout == "fused":
        save_fused(ref, tmp_path)
    loaded, _, _ = check(ref, tmp_path)
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.block_sparse_moe, SparseMoeBlock) and layer.mlp is layer.block_sparse_moe
    assert loaded.config.num_experts == 6 and loaded.config.num_experts_per_tok == 2
    assert not loaded.extra_tensors
    # the loaded experts are the reference's, gate first in the fused tensor
    gu = ref.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    ex = loaded.model.model.layers[1].block_sparse_moe.experts
    np.testing.assert_array_equal(np.asarray(ex.gate_proj[...]), gu[:, :48])
    np.testing.assert_array_equal(np.asarray(ex.up_proj[...]), gu[:, 48:])


def test_mixtral_sliding_window_parity(tmp_path):
    ref = make_tiny(transformers.MixtralForCausalLM, mixtral_config(sliding_window=7), tmp_path)
    loaded, _, _ = check(ref, tmp_path)
    assert loaded.config.sliding_window == 7


@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_parity(layout, norm_topk_prob, tmp_path):
    cfg = qwen3_moe_config(norm_topk_prob=norm_topk_prob, num_hidden_layers=4, mlp_only_layers=[2],
                           decoder_sparse_step=1)
    ref = make_tiny(transformers.Qwen3MoeForCausalLM, cfg, tmp_path)
    if layout == "fused":
        save_fused(ref, tmp_path)
    loaded, _, _ = check(ref, tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in loaded.model.model.layers]
    assert kinds == ["SparseMoeBlock", "SparseMoeBlock", "MLP", "SparseMoeBlock"]
    assert loaded.config.norm_topk_prob is norm_topk_prob
    assert not loaded.extra_tensors


def test_qwen3_moe_sparse_step(tmp_path):
    cfg = qwen3_moe_config(decoder_sparse_step=2, num_hidden_layers=4, tie_word_embeddings=True)
    ref = make_tiny(transformers.Qwen3MoeForCausalLM, cfg, tmp_path)
    loaded, _, _ = check(ref, tmp_path)
    assert loaded.config.mlp_kinds == ("dense", "moe", "dense", "moe")


def _keys(directory):
    from safetensors import safe_open

    out = []
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "np") as h:
            out += list(h.keys())
    return out


def _quantizer_names(model):
    """Full ModelOpt names: plain quantizers by path, stacked ones expanded via ``quantizer_names``."""
    from flax import nnx

    from jaxquant.converters.names import NameMap, dotted

    nm = NameMap.for_config(model.config)
    names = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, MoeExperts):
            continue
        base = nm.hf_name(dotted(path))
        for attr in ("gate_proj_weight_quantizer", "up_proj_input_quantizer", "down_proj_output_quantizer"):
            rel = node.quantizer_names(attr)
            assert len(rel) == node.num_experts
            names[(base, attr)] = [f"{base}.{r}" for r in rel]
    return names


def test_quantizer_names_follow_modelopt(tmp_path):
    ref = make_tiny(transformers.MixtralForCausalLM, mixtral_config(num_hidden_layers=1), tmp_path / "m")
    mx = load_hf(tmp_path / "m", dtype=jnp.float32).model
    names = _quantizer_names(mx)
    base = "model.layers.0.block_sparse_moe.experts"
    assert names[(base, "gate_proj_weight_quantizer")][3] == f"{base}.3.w1.weight_quantizer"
    assert names[(base, "up_proj_input_quantizer")][0] == f"{base}.0.w3.input_quantizer"
    assert names[(base, "down_proj_output_quantizer")][5] == f"{base}.5.w2.output_quantizer"
    plain = dict(iter_quantizers(mx))
    assert "model.layers.0.block_sparse_moe.gate.weight_quantizer" in plain  # router: *block_sparse_moe.gate*
    assert not any(".mlp." in n for n in plain)
    ex = mx.model.layers[0].block_sparse_moe.experts
    assert ex.quantizer_tensor_shape("gate_proj_weight_quantizer") == (6, 48, 64)
    assert ex.quantizer_tensor_shape("down_proj_weight_quantizer") == (6, 64, 48)
    assert ex.quantizer_tensor_shape("down_proj_input_quantizer") == (6, 1, 48)
    assert ex.modelopt_class == "nn.Linear"
    del ref

    make_tiny(transformers.Qwen3MoeForCausalLM, qwen3_moe_config(num_hidden_layers=1), tmp_path / "q")
    qm = load_hf(tmp_path / "q", dtype=jnp.float32).model
    names = _quantizer_names(qm)
    base = "model.layers.0.mlp.experts"
    assert names[(base, "gate_proj_weight_quantizer")][6] == f"{base}.6.gate_proj.weight_quantizer"
    assert names[(base, "up_proj_input_quantizer")][1] == f"{base}.1.up_proj.input_quantizer"
    plain = dict(iter_quantizers(qm))
    assert "model.layers.0.mlp.gate.input_quantizer" in plain  # router: *mlp.gate.*


@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma4_moe"])  # Mixtral's jit path runs in test_moe_upcycle
def test_jit_and_bf16_forward(arch):
    """jit == eager (fp32); bf16 models build, jit and give finite float32 logits. (bf16 vs fp32 is not compared:
    on random tiny MoEs bf16 rounding flips top-k choices, in transformers as much as here.)"""
    from flax import nnx

    from jaxquant.models import ModelConfig, build_model

    if arch == "qwen3_moe":
        hf = qwen3_moe_config(num_hidden_layers=2).to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]}
    else:
        from test_gemma4_parity import GEMMA4_26B

        two = dict(GEMMA4_26B, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
        hf = transformers.Gemma4TextConfig(**two).to_dict() | {"architectures": ["Gemma4ForCausalLM"]}
    config = ModelConfig.from_hf_config(hf)
    ids, mask, _ = inputs(211, seq=12)
    ids, mask = jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32)
    run = nnx.jit(lambda m, i, a: m(i, a))
    m32 = build_model(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(run(m32, ids, mask)), np.asarray(m32(ids, mask)), rtol=1e-4, atol=1e-5)
    m16 = build_model(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = np.asarray(run(m16, ids, mask))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    experts = [m for _, m in nnx.iter_graph(m16) if isinstance(m, MoeExperts)]
    assert experts and all(e.gate_proj[...].dtype == jnp.bfloat16 for e in experts)


def test_missing_expert_names_the_layouts(tmp_path):
    from safetensors.numpy import load_file, save_file

    from jaxquant.errors import CheckpointError

    make_tiny(transformers.Qwen3MoeForCausalLM, qwen3_moe_config(num_hidden_layers=1), tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.\{e\}\.up_proj\.weight"):
        load_hf(tmp_path, dtype=jnp.float32)
