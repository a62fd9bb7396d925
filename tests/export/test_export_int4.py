"""INT4 block-128 weight-only (W4A16_AWQ packing, ``--qformat int4_blockwise_weight_only``): the same tiny Llama
(dims that are multiples of 128) and amax exported by nvidia-modelopt (CPU) and by jaxquant are byte-identical; the
packing, the fake quant and the loader are checked against hand-computed and ModelOpt references."""

import copy

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402


def make_llama128(path, dtype):
    """Tiny Llama whose linears have inputs of 128 / 256 (whole INT4 blocks) and even outputs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        m.model.layers[0].mlp.up_proj.weight[:, :128] = 0.0  # whole zero blocks: scale 1.0, codes 0
    m = m.to(getattr(torch, dtype))
    m.save_pretrained(str(path))
    return m


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_blockwise_byte_identical_to_modelopt(tmp_path, dtype):
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    cfg = copy.deepcopy(QUANT_CFG_CHOICES["int4_blockwise_weight_only"])
    ref = R.compare_exports(tmp_path, cfg, dtype, n_enabled=14, make=make_llama128)  # 7 linears x 2 layers
    assert ref["model.layers.0.mlp.down_proj.weight"][:2] == ("U8", (64, 256))
    assert ref["model.layers.0.mlp.down_proj.weight_scale"][:2] == ("F32", (128, 2))
    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == ("W4A16_AWQ", 128,
                                                                                             False, True)


def test_int4_packing_and_fake_quant_against_modelopt():
    """``pack_rows`` equals ModelOpt's ``pack_int4_in_uint8`` (2-D and stacked experts), and INT4 block fake quant
    equals ModelOpt's tensor quantizer on 1M elements with zero blocks, ties and saturation."""
    import jax.numpy as jnp
    import torch
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer as MOQuantizer

    from jaxquant.numerics import int4

    rng = np.random.default_rng(0)
    for shape in [(64, 256), (3, 32, 128)]:
        w = rng.standard_normal(shape).astype(np.float32)
        scale = (np.abs(w).reshape(*shape[:-1], -1, 128).max(-1) / 7).astype(np.float32)
        ref = pack_int4_in_uint8(torch.tensor(w), torch.tensor(scale), 128).numpy()
        codes, s = int4.quantize(jnp.asarray(w), jnp.asarray(scale * 7))
        np.testing.assert_array_equal(np.asarray(s), scale)
        np.testing.assert_array_equal(np.asarray(int4.pack_rows(codes)), ref)
        np.testing.assert_array_equal(np.asarray(int4.unpack_rows(int4.pack_rows(codes))), np.asarray(codes))

    x = (rng.standard_normal((1024, 1024)) * rng.choice([1e-3, 1.0, 50.0], (1024, 1))).astype(np.float32)
    x[:4, :128] = 0.0  # zero blocks
    x[4, :128] = np.arange(128) / 14.0 - 4.0  # exact ties of x * 7 / amax
    mo = MOQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 128, "type": "static"}))
    mo.eval()
    mo.enable_calib()
    mo.disable_quant()
    mo(torch.tensor(x))
    mo.load_calib_amax()
    mo.disable_calib()
    mo.enable_quant()
    want = mo(torch.tensor(x)).numpy()
    amax = np.abs(x).reshape(1024, 8, 128).max(-1, keepdims=True)
    np.testing.assert_array_equal(mo.amax.numpy().reshape(-1), amax.reshape(-1))
    got = np.asarray(int4.fake_quant(jnp.asarray(x), jnp.asarray(amax), 128))
    np.testing.assert_array_equal(got, want)


def test_int4_export_loads_back(tmp_path):
    """load_quantized unpacks the nibbles and multiplies by the block scales: ``code * scale`` in float32."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf, load_quantized
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.recipe import preset_recipe

    make_llama128(tmp_path / "src", "float32")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    quantize(loaded.model, preset_recipe("int4_blockwise_weight_only", "none"), None, progress=False)
    export_hf(loaded, tmp_path / "jq")
    files = CheckpointFiles.open(tmp_path / "jq")
    packed = np.asarray(files.get("model.layers.1.mlp.down_proj.weight"))
    scale = np.asarray(files.get("model.layers.1.mlp.down_proj.weight_scale"), np.float32)
    lo = (packed & 0x0F).astype(np.int8)
    hi = (packed >> 4).astype(np.int8)
    codes = np.empty((packed.shape[0] * 2, packed.shape[1]), np.int8)
    codes[0::2], codes[1::2] = lo, hi
    codes = np.where(codes > 7, codes - 16, codes).astype(np.float32)
    want = (codes.reshape(codes.shape[0], -1, 128) * scale[:, :, None]).reshape(codes.shape)
    back = load_quantized(tmp_path / "jq", dtype=jnp.float32)
    lin = back.model.model.layers[1].mlp.down_proj
    assert type(lin).__name__ == "QuantizedLinear" and lin.fmt == "int4_awq"
    np.testing.assert_array_equal(np.asarray(lin.dequantized_weight(), np.float32), want)


def test_int4_export_validates_and_a_broken_scale_is_found(tmp_path):
    """jaxquant's checker reads W4A16_AWQ tensors: a clean export has no finding but "no vLLM loader" (TensorRT-LLM
    serves it); a weight_scale of the wrong shape and a negative block scale are findings naming the tensor."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from jaxquant.calibration import quantize
    from jaxquant.check import validate_checkpoint
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.io.safetensors import SafetensorsFile
    from jaxquant.recipe import preset_recipe

    make_llama128(tmp_path / "src", "float32")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    quantize(loaded.model, preset_recipe("int4_blockwise_weight_only", "none"), None, progress=False)
    export_hf(loaded, tmp_path / "jq")
    assert [f for f in validate_checkpoint(tmp_path / "jq").findings if f.rule != "quant-algo-unsupported"] == []
    f = SafetensorsFile(tmp_path / "jq" / "model.safetensors")
    t = {k: np.array(f.get(k)) for k in f.tensors}
    del f
    t["model.layers.0.self_attn.q_proj.weight_scale"] = t["model.layers.0.self_attn.q_proj.weight_scale"][:64]
    t["model.layers.1.mlp.up_proj.weight_scale"][3, 0] = -1.0
    save_file(t, str(tmp_path / "jq" / "model.safetensors"), metadata={"format": "pt"})
    found = {(x.key, x.rule) for x in validate_checkpoint(tmp_path / "jq").findings}
    assert ("model.layers.0.self_attn.q_proj.weight_scale", "scale-shape") in found
    assert ("model.layers.1.mlp.up_proj.weight_scale", "scale-nonpositive") in found
