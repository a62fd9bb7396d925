"""hf_quant_config.json / quantization_config builders against ModelOpt's own functions (CPU)."""

import random

import pytest

from jaxquant.export import quant_config as qc
from jaxquant.quantizer.config import BlockSizes, QuantizerConfig

mo_qu = pytest.importorskip("modelopt.torch.export.quant_utils")
mo_conv = pytest.importorskip("modelopt.torch.export.convert_hf_config")

FP8 = QuantizerConfig(num_bits=(4, 3))
NVFP4 = QuantizerConfig(num_bits=(2, 1), block_sizes=BlockSizes(size=16, type="dynamic", scale_bits=(4, 3)))


def _llama_layers(n_layers, fmt_of, prefix="model."):
    layers = {}
    for i in range(n_layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"{prefix}layers.{i}.{m}"
            fmt = fmt_of(i, m)
            layers[name] = (fmt, 16 if fmt and "nvfp4" in fmt else 0)
    layers["lm_head"] = (None, 0)
    return layers


def _modelopt(layers, kv):
    q = {"quant_algo": None, "kv_cache_quant_algo": None}
    q.update(mo_qu.process_layer_quant_config(qc.layer_config_dict(layers)))
    if kv is not None:
        q["kv_cache_quant_algo"] = kv
    return {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": q}


CASES = {
    "fp8": (lambda i, m: "fp8", None),
    "nvfp4_kv_fp8": (lambda i, m: "nvfp4", "FP8"),
    "nvfp4_first_mlp_excluded": (lambda i, m: None if (i == 0 and "mlp" in m) else "nvfp4", "FP8"),
    "fp8_qkvo_nvfp4_mlp": (lambda i, m: "nvfp4" if "mlp" in m else "fp8", "FP8"),
    "mlp_only": (lambda i, m: "nvfp4" if "mlp" in m else None, None),
    "w4a16": (lambda i, m: "w4a16_nvfp4", None),
    "static_and_dynamic": (lambda i, m: "nvfp4_static" if i == 1 else "nvfp4", "NVFP4"),
    "fp8_pc_pt": (lambda i, m: "fp8_pc_pt", None),
    "only_kv": (lambda i, m: None, "FP8"),
    "layer_10_excluded": (lambda i, m: None if i == 10 else "fp8", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("prefix", ["model.", "model.language_model."])
def test_matches_modelopt(case, prefix):
    fmt_of, kv = CASES[case]
    layers = _llama_layers(12, fmt_of, prefix)
    ours = qc.build_hf_quant_config(layers, kv)
    ref = _modelopt(layers, kv)
    assert ours["producer"]["name"] == "jaxquant"
    assert ours["quantization"] == ref["quantization"]
    assert list(ours["quantization"]) == list(ref["quantization"])  # same key order too
    ours_cfg = qc.convert_hf_quant_config_format(ours)
    ref_cfg = mo_conv.convert_hf_quant_config_format(ref)
    ours_cfg.pop("producer"), ref_cfg.pop("producer")
    assert ours_cfg == ref_cfg
    assert ours_cfg["quant_method"] == "modelopt"


def test_summarize_random_names_matches_modelopt():
    rng = random.Random(0)
    parts = ["model", "layers", "0", "1", "12", "mlp", "self_attn", "q_proj", "gate", "experts", "3", "lm_head", "a"]
    for _ in range(300):
        names = sorted({".".join(rng.choice(parts) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 12))})
        rng.shuffle(names)
        k = rng.randint(0, len(names))
        quant, unq = names[:k], names[k:]
        assert qc.summarize_exclude_modules(unq, quant) == mo_qu._prefix_wildcard_summarize_exclude_modules(unq, quant)


def test_spec_example():
    layers = {f"model.layers.0.{m}": ("nvfp4", 16) for m in ("self_attn.q_proj", "mlp.down_proj")}
    layers["lm_head"] = (None, 0)
    cfg = qc.build_hf_quant_config(layers, "FP8")
    assert cfg["quantization"] == {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                                   "exclude_modules": ["lm_head"]}
    conv = qc.convert_hf_quant_config_format(cfg)
    assert conv["config_groups"]["group_0"]["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    assert conv["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert conv["ignore"] == ["lm_head"] and conv["quant_method"] == "modelopt"


def test_modelopt_format_mapping():
    assert qc.modelopt_format(FP8, FP8) == "fp8"
    assert qc.modelopt_format(FP8, None) == "fp8"
    assert qc.modelopt_format(NVFP4, NVFP4) == "nvfp4"
    assert qc.modelopt_format(NVFP4, None) == "w4a16_nvfp4"
    assert qc.modelopt_format(None, NVFP4) is None
    assert qc.modelopt_format(QuantizerConfig(enable=False, num_bits=(4, 3)), FP8) is None
    with pytest.raises(qc.UnsupportedError, match="W4A8"):
        qc.modelopt_format(NVFP4, FP8)
    assert qc.kv_cache_algo(FP8) == "FP8"
    assert qc.kv_cache_algo(QuantizerConfig(num_bits=(4, 3), use_constant_amax=True)) == "FP8"
    assert qc.kv_cache_algo(NVFP4) == "NVFP4"
    assert qc.kv_cache_algo(None) is None
