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


@pytest.mark.parametrize("attn_fmt,mlp_fmt", [("nvfp4", None), ("fp8", "nvfp4")], ids=["nvfp4", "fp8_qkvo-nvfp4_mlp"])
def test_qwen3_moe_byte_identical_to_modelopt(tmp_path, attn_fmt, mlp_fmt):
    """transformers-5 fused experts in ModelOpt (_QuantFusedExperts: one weight quantizer per expert for
    gate+up, one input quantizer per projection for all experts) vs jaxquant's stacked experts. With FP8 attention and
    NVFP4 experts (the founding recipe's split, MIXED_PRECISION) ModelOpt lists each layer's fused experts once in
    quantized_layers and config_groups (``model.layers.0.mlp.experts``) while the tensors stay per expert."""
    R.export_qwen3_moe_pair(tmp_path / "src", tmp_path / "mo", tmp_path / "jq", weight_fmt=attn_fmt, mlp_fmt=mlp_fmt)
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
    if mlp_fmt is not None:
        from jaxquant.check import validate_checkpoint
        from jaxquant.export import load_quantized

        assert "model.layers.0.mlp.experts" in R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"][
            "quantized_layers"]
        assert validate_checkpoint(tmp_path / "jq").findings == []  # the experts prefix covers every projection
        load_quantized(tmp_path / "jq")  # and the loader finds each expert's format through it
