"""FP8 2-D block weight-only (FP8_PB_WO, ``--qformat fp8_2d_blockwise_weight_only``): fake quant equals ModelOpt's
``TensorQuantizer`` bit for bit (CPU), the export of the same tiny Llama and amax is byte-identical to
nvidia-modelopt 0.47's, and it loads back. Dimensions 256 and 320 exercise several blocks and the zero padding."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
import numpy as np  # noqa: E402

FP8_PB = {"num_bits": (4, 3), "axis": None, "block_sizes": {-1: 128, -2: 128}}
CFG = {"quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*weight_quantizer", "cfg": FP8_PB},
    {"quantizer_name": "*input_quantizer", "enable": False},
    {"quantizer_name": "*lm_head*", "enable": False},
    {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False},
], "algorithm": "max"}


def _llama(path, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype))
    m.save_pretrained(str(path))
    return m


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_block_fake_quant_matches_modelopt(dtype):
    import jax.numpy as jnp
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer as MTQ

    from jaxquant.quantizer.config import QuantizerConfig
    from jaxquant.quantizer.tensor_quantizer import TensorQuantizer

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(320, 1000, generator=g) * torch.logspace(-3, 1, 320)[:, None]).to(getattr(torch, dtype))
    w[:128, :128] = 0  # an all-zero block
    ref_q = MTQ(QuantizerAttributeConfig(**FP8_PB))
    ref_q.enable_calib()
    ref_q.disable_quant()
    ref_q(w)
    ref_q.load_calib_amax()
    ref_q.enable_quant()
    ref_q.disable_calib()
    ref = ref_q(w).float().numpy()
    q = TensorQuantizer()
    q.configure(QuantizerConfig.from_dict(FP8_PB), tensor_shape=tuple(w.shape))
    x = jnp.asarray(w.float().numpy()).astype(getattr(jnp, dtype))
    q.calibrate_weight(x)
    np.testing.assert_array_equal(np.asarray(q.amax[...]).reshape(-1), ref_q.amax.float().numpy().reshape(-1))
    q.set_mode("fake_quant")
    ours = np.asarray(q(x), np.float32)
    np.testing.assert_array_equal(ours.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_block_byte_identical_to_modelopt_and_loads_back(tmp_path, dtype):
    import jax.numpy as jnp

    from jaxquant.export import load_quantized
    from jaxquant.io.safetensors import CheckpointFiles

    ref = R.compare_exports(tmp_path, CFG, dtype, n_enabled=14, make=_llama)
    assert ref["model.layers.0.mlp.gate_proj.weight_scale"][:2] == ("F32", (3, 1, 2, 1))

    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    lin = back.model.model.layers[0].mlp.down_proj
    assert lin.fmt == "fp8_pb_wo"
    files = CheckpointFiles.open(tmp_path / "jq")
    q = np.asarray(files.get("model.layers.0.mlp.down_proj.weight")).astype(np.float32)
    s = np.asarray(files.get("model.layers.0.mlp.down_proj.weight_scale"))[:, 0, :, 0]
    scale = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[: q.shape[0], : q.shape[1]]
    np.testing.assert_array_equal(np.asarray(lin.dequantized_weight(), np.float32), q * scale)
