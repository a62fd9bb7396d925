"""Loader errors name the file and tensor (and list supported architectures); round trip without torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxquant.converters import load_hf
from jaxquant.converters.names import hf_param_names
from jaxquant.errors import CheckpointError, UnsupportedError
from jaxquant.io.safetensors import save_file
from jaxquant.models import ModelConfig, build_model

HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 50, "hidden_size": 16,
      "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
      "tie_word_embeddings": False, "rope_theta": 10000.0}


def _write(d: Path, hf=HF, tensors=None, shards: int = 1):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf))
    if tensors is None:
        m = build_model(ModelConfig.from_hf_config(hf), dtype=jnp.float32, rngs=nnx.Rngs(0))
        names = hf_param_names(m)
        state = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
        tensors = {names[".".join(map(str, p))]: np.asarray(v.get_value()) for p, v in state.items()}
    if shards == 1:
        save_file(tensors, d / "model.safetensors")
    else:
        keys = sorted(tensors)
        parts = [keys[i::shards] for i in range(shards)]
        wm = {}
        for i, part in enumerate(parts):
            fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, d / fn)
            wm.update({k: fn for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return tensors


def test_round_trip_without_torch(tmp_path):
    tensors = _write(tmp_path / "ck", shards=3)
    loaded = load_hf(tmp_path / "ck", dtype=jnp.float32)
    for name, arr in tensors.items():
        p = loaded.name_map.nnx_path(name)
        mod = loaded.model
        *parents, leaf = p.split(".")
        for part in parents:
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        np.testing.assert_array_equal(np.asarray(getattr(mod, leaf)[...]), arr)
    assert loaded.extra_tensors == {}
    bf = load_hf(tmp_path / "ck")  # bf16 default
    assert bf.model.model.layers[0].mlp.up_proj.weight[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(bf.model.model.layers[0].mlp.up_proj.weight[...]),
        tensors["model.layers.0.mlp.up_proj.weight"].astype(ml_dtypes.bfloat16))
    f16 = load_hf(tmp_path / "ck", dtype="float16")
    assert f16.model.lm_head.weight[...].dtype == jnp.float16
    import jax

    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    seen = []
    sh = load_hf(tmp_path / "ck", dtype=jnp.float32, sharding=lambda path, shape: seen.append((path, shape)) or dev)
    assert ("model.layers.1.mlp.down_proj.weight", (16, 24)) in seen
    assert sh.model.lm_head.weight[...].sharding == dev


def test_unknown_architecture_lists_supported(tmp_path):
    _write(tmp_path, tensors={"x": np.zeros(2, np.float32)})
    (tmp_path / "config.json").write_text(json.dumps({**HF, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Gemma3ForConditionalGeneration" in msg


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path)


def test_missing_tensor_named(tmp_path):
    t = _write(tmp_path)
    del t["model.layers.1.self_attn.k_proj.bias"]
    _write(tmp_path, tensors=t)
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path)
    assert "model.layers.1.self_attn.k_proj.bias" in str(e.value) and "model.safetensors" in str(e.value)


def test_shape_mismatch_named(tmp_path):
    t = _write(tmp_path)
    t["model.layers.0.mlp.down_proj.weight"] = np.zeros((16, 25), np.float32)
    _write(tmp_path, tensors=t)
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg and "[16, 25]" in msg and "[16, 24]" in msg


def test_unloadable_dtype_named(tmp_path):
    t = _write(tmp_path)
    t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"].astype(
        ml_dtypes.float8_e4m3fn)
    _write(tmp_path, tensors=t)
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path)
    assert "model.layers.0.self_attn.q_proj.weight" in str(e.value) and "F8_E4M3" in str(e.value)


def test_unexpected_text_tensor(tmp_path):
    t = _write(tmp_path)
    t["model.layers.5.mlp.up_proj.weight"] = np.zeros((24, 16), np.float32)
    _write(tmp_path, tensors=t)
    with pytest.raises(CheckpointError, match="model.layers.5.mlp.up_proj.weight"):
        load_hf(tmp_path)


def test_ignored_rotary_buffer(tmp_path):
    t = _write(tmp_path)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    _write(tmp_path, tensors=t)
    assert load_hf(tmp_path, dtype=jnp.float32).extra_tensors == {}


def test_truncated_and_missing_shards(tmp_path):
    _write(tmp_path / "a", shards=2)
    shard = tmp_path / "a" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf(tmp_path / "a")
    shard.unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf(tmp_path / "a")


@pytest.mark.parametrize("change, exc, text", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, UnsupportedError, "longrope"),
    ({"hidden_act": "mish"}, UnsupportedError, "mish"),
    ({"hidden_size": None}, CheckpointError, "hidden_size"),
    ({"architectures": []}, UnsupportedError, "supported architectures"),
    ({"model_type": "llama"}, UnsupportedError, "model_type"),
])
def test_config_errors(change, exc, text):
    with pytest.raises(exc, match=text):
        ModelConfig.from_hf_config({**HF, **change})


def test_legacy_config_keys():
    """Pre-v5 config.json spellings: rope_theta / rope_scaling, Gemma 3 rope_local_base_freq and pattern."""
    c = ModelConfig.from_hf_config({**HF, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0,
                                                                        "low_freq_factor": 1.0,
                                                                        "high_freq_factor": 4.0,
                                                                        "original_max_position_embeddings": 8192}})
    r = c.rope_for("full_attention")
    assert r.rope_type == "llama3" and r.theta == 5e5 and r.factor == 8.0
    g = ModelConfig.from_hf_config({**HF, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                                    "num_hidden_layers": 7, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                    "sliding_window": 512, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert g.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert g.rope_for("sliding_attention").theta == 1e4 and g.rope_for("sliding_attention").rope_type == "default"
    assert g.rope_for("full_attention").theta == 1e6 and g.rope_for("full_attention").factor == 8.0
    assert g.attention_scale == 256 ** -0.5 and g.norm_offset == 1.0 and g.embed_scale == 4.0
    g2 = ModelConfig.from_hf_config({k: v for k, v in {**HF, "architectures": ["Gemma3ForCausalLM"],
                                                       "model_type": "gemma3_text"}.items()
                                     if k != "tie_word_embeddings"})
    assert g2.tie_word_embeddings and g2.hidden_act == "gelu_pytorch_tanh" and g2.sliding_window == 4096


def test_legacy_multimodal_names(tmp_path):
    """Old Gemma 3 VLM checkpoints (language_model.model.*) load and export under the v5 names."""
    hf = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
          "text_config": {"model_type": "gemma3_text", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                          "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4},
          "vision_config": {"model_type": "siglip_vision_model"}}
    m = build_model(ModelConfig.from_hf_config(hf), dtype=jnp.float32, rngs=nnx.Rngs(0))
    state = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
    tensors = {"language_model." + ".".join(map(str, p)): np.asarray(v.get_value()) for p, v in state.items()}
    tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    tensors["multi_modal_projector.mm_input_projection_weight"] = np.ones((4, 16), np.float32)
    _write(tmp_path, hf=hf, tensors=tensors)
    loaded = load_hf(tmp_path, dtype=jnp.float32)
    assert sorted(loaded.extra_tensors) == ["model.multi_modal_projector.mm_input_projection_weight",
                                            "model.vision_tower.vision_model.post_layernorm.weight"]
    assert loaded.extra_tensors["model.multi_modal_projector.mm_input_projection_weight"].shape == (4, 16)
    np.testing.assert_array_equal(np.asarray(loaded.model.model.norm.weight[...]),
                                  tensors["language_model.model.norm.weight"])


def test_gguf_errors(tmp_path):
    gguf = pytest.importorskip("gguf")
    from jaxquant.converters.gguf import load_gguf

    p = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="llama"):
        load_gguf(p)
    bad = tmp_path / "trunc.gguf"
    shutil.copy(p, bad)
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="trunc.gguf"):
        load_gguf(bad)
    with pytest.raises(CheckpointError, match="missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")
