"""Gemma 4 with an FP8 KV cache: the export carries ``k_proj.k_scale`` / ``v_proj.v_scale`` for every attention
layer and ``kv_cache_quant_algo: FP8``, byte-identical to nvidia-modelopt's export of the same model and amax.

Regression (issue 10): ``Gemma4Attention`` is not ``layers.Attention``, so the export's site walk missed it: the
k/v bmm quantizers were calibrated but the checkpoint had no KV scales and ``kv_cache_quant_algo: null``, and
serving engines then ran the FP8 KV cache at scale 1.0.

The tiny model has both Gemma 4 attention variants that lack projections: ``attention_k_eq_v`` full-attention
layers (no ``v_proj``: ModelOpt still writes ``v_proj.v_scale`` from the layer's ``v_bmm_quantizer``) and
KV-shared layers (no ``k_proj`` / ``v_proj``: ModelOpt writes both scales from the quantizers of the shared
layer, which act on the keys and values it attends to).

ModelOpt runs on CPU: max calibration (statistics only) and the export need no CUDA. Its amax are loaded into
jaxquant as a calibration state (strict: both sides must have the same state-bearing quantizers).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402

RECIPE = "general/ptq/nvfp4_default-kv_fp8"
PATTERN = ["sliding_attention", "sliding_attention", "full_attention"]
# 6 layers: 0-2 own their KV (2 = full attention with k=v), 3-5 reuse the KV of layers 1 (sliding) and 2 (full).
GEMMA4 = dict(
    vocab_size=211, hidden_size=64, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    layer_types=PATTERN * 2, sliding_window=7, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
    num_kv_shared_layers=3, tie_word_embeddings=True, max_position_embeddings=128,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
)


def _make_gemma4(directory, *, seed=0, noise=0.2):
    torch.manual_seed(seed)
    config = transformers.Gemma4TextConfig(**GEMMA4)
    config._attn_implementation = "eager"
    model = transformers.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(str(directory))
    return model


def _modelopt_quant_cfg() -> dict:
    from modelopt.recipe.loader import load_recipe

    q = load_recipe(RECIPE).quantize
    q = q.model_dump() if hasattr(q, "model_dump") else dict(q)
    return {"quant_cfg": q["quant_cfg"], "algorithm": q.get("algorithm", "max")}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(modelopt export dir, jaxquant export dir, modelopt amax) of the same tiny Gemma 4."""
    import jax.numpy as jnp

    from jaxquant.calibration.state import load_calibration_state
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.recipe import apply_recipe

    tmp = tmp_path_factory.mktemp("gemma4_kv")
    model = _make_gemma4(tmp / "src")
    assert model.config.kv_sharing_modes == [None, "store", "store", "reuse", "reuse", "reuse"]
    amax = R.modelopt_quantize(model, _modelopt_quant_cfg())
    R.modelopt_export(model, tmp / "mo", "float32")

    loaded = load_hf(tmp / "src", dtype=jnp.float32)
    apply_recipe(loaded.model, RECIPE)
    load_calibration_state(loaded.model, {f"{k}._amax": v for k, v in amax.items()})
    export_hf(loaded, tmp / "jq")
    return tmp / "mo", tmp / "jq", amax


def _kv_names(tensors) -> list[str]:
    return sorted(k for k in tensors if k.endswith((".k_scale", ".v_scale")))


def test_every_attention_layer_has_modelopt_kv_scales(exports):
    mo, jq, amax = exports
    ref, ours = R.tensors_of(mo), R.tensors_of(jq)
    expected = [f"model.layers.{i}.self_attn.{p}" for i in range(6) for p in ("k_proj.k_scale", "v_proj.v_scale")]
    # ModelOpt writes the scales of every layer: k=v layer 2 (no v_proj) and the KV-shared layers 3-5 too
    assert _kv_names(ref) == sorted(expected)
    assert _kv_names(ours) == _kv_names(ref)
    for k in _kv_names(ref):
        assert ours[k][:2] == ref[k][:2] == ("F32", ()), k
        assert ours[k][2] == ref[k][2], f"{k}: bytes differ"
        role = "k_bmm_quantizer" if k.endswith("k_scale") else "v_bmm_quantizer"
        src = k.rsplit(".", 2)[0] + "." + role
        assert np.frombuffer(ours[k][2], np.float32)[0] == np.float32(amax[src].reshape(()) / np.float32(448.0))
    assert "model.layers.2.self_attn.v_proj.weight" not in ours  # k=v: a scale without a projection, like ModelOpt
    assert "model.layers.3.self_attn.k_proj.weight" not in ours


def test_kv_cache_quant_algo_is_fp8_like_modelopt(exports):
    mo, jq, _ = exports
    a, b = R.json_of(mo / "hf_quant_config.json"), R.json_of(jq / "hf_quant_config.json")
    assert a["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert json.dumps(b["quantization"]["kv_cache_quant_algo"]) == json.dumps(a["quantization"]["kv_cache_quant_algo"])
    ca, cb = R.json_of(mo / "config.json"), R.json_of(jq / "config.json")
    assert cb["quantization_config"]["kv_cache_scheme"] == ca["quantization_config"]["kv_cache_scheme"]


def test_whole_export_byte_identical_to_modelopt(exports):
    """Beyond the KV scales: every tensor and both quantization configs equal ModelOpt's."""
    mo, jq, _ = exports
    ref, ours = R.tensors_of(mo), R.tensors_of(jq)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k][:2] == ref[k][:2], k
        assert ours[k][2] == ref[k][2], f"{k}: bytes differ"
    a, b = R.json_of(mo / "hf_quant_config.json"), R.json_of(jq / "hf_quant_config.json")
    a.pop("producer"), b.pop("producer")
    assert a == b
    ca, cb = R.json_of(mo / "config.json")["quantization_config"], R.json_of(jq / "config.json")["quantization_config"]
    ca.pop("producer"), cb.pop("producer")
    assert ca == cb


def test_load_quantized_restores_the_kv_fake_quant_of_every_layer(exports):
    """The loader configures K/V fake quant from the scales for Gemma 4's attention too (k=v and KV-shared layers)."""
    from jaxquant.export import load_quantized

    _, jq, amax = exports
    loaded = load_quantized(jq)
    for i, layer in enumerate(loaded.model.model.layers):
        for role in ("k_bmm_quantizer", "v_bmm_quantizer"):
            q = getattr(layer.self_attn, role)
            assert q.enabled and q.mode == "fake_quant", (i, role)
            assert np.float32(q.amax.value) == np.float32(amax[f"model.layers.{i}.self_attn.{role}"].reshape(()))
