"""MoE export: per-expert ModelOpt names, shared expert input scales, gate/up weight_scale_2, routers excluded."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

import _export_modelopt_ref as R  # noqa: E402

from jaxquant.calibration import quantize  # noqa: E402
from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.export import export_hf, load_quantized  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
MODELS = {
    "qwen3_moe": (lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **BASE, intermediate_size=80, moe_intermediate_size=32, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True)), "mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **BASE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)), "block_sparse_moe", ("w1", "w3", "w2")),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_moe_export(tmp_path, arch):
    make, block, (g, u, dn) = MODELS[arch]
    torch.manual_seed(0)
    make().eval().save_pretrained(str(tmp_path / "src"))
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (4, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    quantize(loaded.model, "general/ptq/nvfp4_default-kv_fp8", (ids, mask), batch_size=2, progress=False)
    ref = np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(mask)))
    export_hf(loaded, tmp_path / "out")
    src, out = R.tensors_of(tmp_path / "src"), R.tensors_of(tmp_path / "out")
    assert set(src) <= set(out)  # the hub layout, nothing renamed or fused
    assert all(k.endswith(("_scale", "_scale_2")) for k in set(out) - set(src))
    for layer in range(2):
        p = f"model.layers.{layer}.{block}"
        assert out[f"{p}.gate.weight"] == src[f"{p}.gate.weight"]  # router untouched
        ins_gu = {out[f"{p}.experts.{e}.{n}.input_scale"][2] for e in range(4) for n in (g, u)}
        ins_dn = {out[f"{p}.experts.{e}.{dn}.input_scale"][2] for e in range(4)}
        assert len(ins_gu) == 1 and len(ins_dn) == 1  # one input scale per projection for all experts
        for e in range(4):
            assert out[f"{p}.experts.{e}.{g}.weight"][0] == "U8"
            assert out[f"{p}.experts.{e}.{g}.weight_scale_2"] == out[f"{p}.experts.{e}.{u}.weight_scale_2"]
    hq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4"
    assert "model.layers.0.{}.gate".format(block) in hq["exclude_modules"]
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    got = np.asarray(back.model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
