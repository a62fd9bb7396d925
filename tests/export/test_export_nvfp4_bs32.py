"""NVFP4 in blocks of 32: ``--qformat nvfp4_mlp_weight_only`` (W4A16_NVFP4, group_size 32) and ``--qformat
w4a8_nvfp4_fp8`` (W4A8_NVFP4_FP8: FP8 activations, ``weight_scale_2 = amax / 448``). The same tiny Llama and amax
exported by nvidia-modelopt 0.47 (CPU) and by jaxquant are byte-identical, both JSON files included."""

import copy

import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402


def _cfg(qformat):
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    return copy.deepcopy(QUANT_CFG_CHOICES[qformat])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nvfp4_mlp_weight_only_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, _cfg("nvfp4_mlp_weight_only"), dtype, n_enabled=6)  # 3 MLP linears x 2
    assert ref["model.layers.0.mlp.down_proj.weight_scale"][:2] == ("F8_E4M3", (64, 3))  # 96 inputs / 32
    hfq = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert hfq["quant_algo"] == "W4A16_NVFP4" and hfq["group_size"] == 32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w4a8_nvfp4_fp8_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, _cfg("w4a8_nvfp4_fp8"), dtype, n_enabled=28)  # 7 linears x 2 x (w, in)
    assert ref["model.layers.0.self_attn.q_proj.input_scale"][:2] == ("F32", ())
    assert R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]["quant_algo"] == "W4A8_NVFP4_FP8"
