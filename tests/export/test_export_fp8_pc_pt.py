"""FP8 per-channel weights + per-token dynamic FP8 activations (FP8_PER_CHANNEL_PER_TOKEN, ``--qformat
fp8_per_channel_per_token``): the activations' fake quant equals ModelOpt's ``TensorQuantizer`` bit for bit (CPU),
and the export of the same tiny Llama and amax is byte-identical to nvidia-modelopt 0.47's."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
import numpy as np  # noqa: E402

PER_TOKEN = {"num_bits": (4, 3), "axis": None, "type": "dynamic", "block_sizes": {-1: None}}
CFG = {"quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": 0}},
    {"quantizer_name": "*input_quantizer", "cfg": PER_TOKEN},
    {"quantizer_name": "*lm_head*", "enable": False},
    {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False},
], "algorithm": "max"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_token_fake_quant_matches_modelopt(dtype):
    import jax.numpy as jnp
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer as MTQ

    from jaxquant.quantizer.config import QuantizerConfig
    from jaxquant.quantizer.tensor_quantizer import TensorQuantizer

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 300, 1024, generator=g) * torch.logspace(-4, 2, 300)[None, :, None]).to(getattr(torch, dtype))
    x[1, 7] = 0  # an all-zero token
    ref = MTQ(QuantizerAttributeConfig(**PER_TOKEN))(x).float().numpy()
    q = TensorQuantizer()
    q.configure(QuantizerConfig.from_dict(PER_TOKEN))
    q.set_mode("fake_quant")
    ours = np.asarray(q(jnp.asarray(x.float().numpy()).astype(getattr(jnp, dtype))), np.float32)
    np.testing.assert_array_equal(ours.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_pc_pt_byte_identical_to_modelopt(tmp_path, dtype):
    ref = R.compare_exports(tmp_path, CFG, dtype, n_enabled=14)  # the weights only: the inputs are dynamic
    assert ref["model.layers.0.self_attn.k_proj.weight_scale"][:2] == ("F32", (32,))
    assert not any(k.endswith("input_scale") for k in ref)
    assert R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]["quant_algo"] == \
        "FP8_PER_CHANNEL_PER_TOKEN"
