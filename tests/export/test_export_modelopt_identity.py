"""The same tiny Llama, weights and amax, exported by nvidia-modelopt (CPU) and by jaxquant:
every safetensors tensor byte-identical, hf_quant_config.json and config.json equal but for producer."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402

CASES = {
    "fp8": ("fp8", False, None),
    "fp8_kv": ("fp8", True, None),
    "nvfp4_kv_fp8": ("nvfp4", True, None),
    "fp8_qkvo_nvfp4_mlp_kv": ("fp8", True, "nvfp4"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,tie", [("float32", False), ("bfloat16", True)])
def test_byte_identical_to_modelopt(tmp_path, case, dtype, tie):
    from jaxquant.export import export_hf

    wf, kv, mlp = CASES[case]
    src = tmp_path / "src"
    model = R.make_llama(src, tie=tie, dtype=dtype)
    amax = R.modelopt_quantize(model, R.modelopt_cfg(wf, kv, mlp))
    R.modelopt_export(model, tmp_path / "mo", dtype)
    loaded = R.load_into_jaxquant(src, R.jaxquant_configs(wf, kv, mlp), amax, dtype)
    export_hf(loaded, tmp_path / "jq")

    ref, ours = R.tensors_of(tmp_path / "mo"), R.tensors_of(tmp_path / "jq")
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k][:2] == ref[k][:2], k
        assert ours[k][2] == ref[k][2], f"{k}: bytes differ"

    hq_ref, hq = R.json_of(tmp_path / "mo" / "hf_quant_config.json"), R.json_of(tmp_path / "jq" / "hf_quant_config.json")
    assert hq.pop("producer")["name"] == "jaxquant"
    hq_ref.pop("producer")
    assert hq == hq_ref
    c_ref, c = R.json_of(tmp_path / "mo" / "config.json"), R.json_of(tmp_path / "jq" / "config.json")
    assert c["quantization_config"].pop("producer")["name"] == "jaxquant"
    c_ref["quantization_config"].pop("producer")
    assert c == c_ref


def test_qwen3_moe_byte_identical_to_modelopt(tmp_path):
    """transformers-5 fused experts in ModelOpt (_QuantFusedExperts: one weight quantizer per expert for
    gate+up, one input quantizer per projection for all experts) vs jaxquant's stacked experts."""
    import re

    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jaxquant.converters import iter_quantizers, load_hf
    from jaxquant.export import export_hf

    torch.manual_seed(0)
    E = 4
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, intermediate_size=80,
                                      moe_intermediate_size=32, head_dim=16, num_experts=E, num_experts_per_tok=2,
                                      norm_topk_prob=True)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(str(tmp_path / "src"))
    mo_cfg = R.modelopt_cfg("nvfp4", True)
    mo_cfg["quant_cfg"] += [{"quantizer_name": "*mlp.gate.*", "enable": False}]
    amax = R.modelopt_quantize(model, mo_cfg)
    R.modelopt_export(model, tmp_path / "mo", "float32")

    def mo_amax(name):
        m = re.match(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)_(weight|input)_quantizer$", name)
        if not m:
            return amax.get(name)
        p, proj, role = m.groups()
        base = "down_proj" if proj == "down_proj" else "gate_up_proj"
        if role == "input":
            return np.full(E, float(amax[f"{p}.{base}_input_quantizer"].reshape(())), np.float32)
        return np.array([float(amax[f"{p}.{base}_weight_quantizers.{e}"].reshape(())) for e in range(E)], np.float32)

    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    resolve = R.jaxquant_configs("nvfp4", True)
    for name, q in iter_quantizers(loaded.model, loaded.name_map):
        c = None if ".mlp.gate." in name + "." else resolve(name)
        q.configure(c)
        if c is not None:
            q.amax.value = jnp.asarray(mo_amax(name), jnp.float32).reshape(q.amax.value.shape)
    export_hf(loaded, tmp_path / "jq")
    ref, ours = R.tensors_of(tmp_path / "mo"), R.tensors_of(tmp_path / "jq")
    assert sorted(ours) == sorted(ref)
    assert "model.layers.0.mlp.experts.3.up_proj.weight_scale_2" in ours
    for k in ref:
        assert ours[k] == ref[k], k
    for f in ("hf_quant_config.json", "config.json"):
        a, b = R.json_of(tmp_path / "mo" / f), R.json_of(tmp_path / "jq" / f)
        (a.get("quantization_config") or a).pop("producer")
        (b.get("quantization_config") or b).pop("producer")
        assert a == b, f
