"""export_hf: atomicity and refusal, sharding, non-finite weights, check_exportable, multimodal extras."""

import errno
import json

import numpy as np
import pytest

pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

import _export_modelopt_ref as R  # noqa: E402

from jaxquant.calibration import quantize  # noqa: E402
from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.errors import ExportError, NonFiniteError, UnsupportedError  # noqa: E402
from jaxquant.export import check_exportable, export_hf  # noqa: E402
from jaxquant.export import shards as shards_mod  # noqa: E402
from jaxquant.export.load_quantized import load_quantized  # noqa: E402
from jaxquant.io.safetensors import CheckpointFiles  # noqa: E402
from jaxquant.recipe import apply_recipe  # noqa: E402

RECIPE = "general/ptq/nvfp4_default-kv_fp8"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    R.make_llama(d / "src", tie=False, dtype="bfloat16")
    (d / "src" / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (d / "src" / "chat_template.jinja").write_text("{{ messages }}")
    loaded = load_hf(d / "src", dtype=jnp.bfloat16)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    quantize(loaded.model, RECIPE, (ids, np.ones_like(ids)), batch_size=2, progress=False)
    return loaded


def _entries(parent):
    return sorted(p.name for p in parent.iterdir())


def test_layout_and_aux_files(calibrated, tmp_path):
    s = export_hf(calibrated, tmp_path / "out")
    names = _entries(tmp_path / "out")
    for f in ("config.json", "hf_quant_config.json", "model.safetensors", "generation_config.json",
              "tokenizer_config.json", "chat_template.jinja"):
        assert f in names, f
    assert not any(".jaxquant" in n for n in names)
    hq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "jaxquant"
    assert hq["quantization"] == {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                                  "exclude_modules": ["lm_head", "model.embed_tokens"]}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    ck = CheckpointFiles.open(tmp_path / "out")
    assert ck.tensor_info("model.layers.0.mlp.up_proj.weight").dtype == "U8"
    assert ck.tensor_info("model.norm.weight").dtype == "BF16"  # unquantized: source dtype kept
    assert ck.tensor_info("lm_head.weight").dtype == "BF16"
    assert s.dtypes["U8"]["tensors"] == 14 and 4.0 < s.bits_per_param < 16.0
    assert "bits/parameter" in s.describe()


def test_refuses_non_empty_target_and_overwrites(calibrated, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(calibrated, out)
    assert _entries(out) == ["precious.txt"]
    export_hf(calibrated, out, overwrite=True)
    assert "precious.txt" not in _entries(out) and "model.safetensors" in _entries(out)
    with pytest.raises(ExportError, match="source checkpoint"):
        export_hf(calibrated, calibrated.source_dir, overwrite=True)


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(calibrated, tmp_path, monkeypatch, exc):
    calls = []
    real = shards_mod._write_tensor

    def failing(fd, offset, arr, stop):
        calls.append(offset)
        if len(calls) == 6:  # a later tensor's write (a writer thread) hits the disk-full / Ctrl-C
            raise exc
        return real(fd, offset, arr, stop)

    monkeypatch.setattr(shards_mod, "_write_tensor", failing)
    expected = ExportError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        export_hf(calibrated, tmp_path / "out", max_shard_size="20KB")
    assert _entries(tmp_path) == []  # no target, no temporary directory


def test_failure_keeps_previous_export(calibrated, tmp_path, monkeypatch):
    export_hf(calibrated, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(shards_mod, "_write_tensor", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_hf(calibrated, tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert _entries(tmp_path) == ["out"]


def test_sharded_export_loads_back(calibrated, tmp_path):
    s = export_hf(calibrated, tmp_path / "out", max_shard_size="30KB")
    assert len(s.files) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(s.files)
    assert index["metadata"]["total_size"] == s.total_bytes
    single = export_hf(calibrated, tmp_path / "one")
    a, b = R.tensors_of(tmp_path / "out"), R.tensors_of(tmp_path / "one")
    assert a == b
    assert single.files == ["model.safetensors"]
    back = load_quantized(tmp_path / "out", dtype=jnp.bfloat16)
    ids = jnp.asarray(np.arange(10, dtype=np.int32)[None])
    np.testing.assert_array_equal(np.asarray(back.model(ids)),
                                  np.asarray(load_quantized(tmp_path / "one", dtype=jnp.bfloat16).model(ids)))


def test_non_finite_weight_names_layer(tmp_path):
    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (2, 8)).astype(np.int32)
    quantize(loaded.model, "general/ptq/fp8_default-kv_fp8", (ids, np.ones_like(ids)), batch_size=2, progress=False)
    w = loaded.model.model.layers[1].mlp.up_proj.weight
    w.value = w.value.at[3, 4].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        export_hf(loaded, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _configured(tmp_path, recipe, **llama):
    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    apply_recipe(loaded.model, recipe)
    return loaded


def _recipe(rules):
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *rules], "algorithm": "max"}


FP8 = {"num_bits": "e4m3", "axis": None}
NVFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}


def test_check_exportable_before_calibration(tmp_path):
    ok = _configured(tmp_path / "a", "general/ptq/fp8_qkvo-nvfp4_mlp")
    assert check_exportable(ok, export_dir=tmp_path / "new") == []
    bad = _configured(tmp_path / "b", _recipe([
        {"quantizer_name": "*weight_quantizer", "cfg": FP8}, {"quantizer_name": "*input_quantizer", "cfg": FP8},
        {"quantizer_name": "*q_proj.weight_quantizer", "cfg": NVFP4},
        {"quantizer_name": "*q_proj.input_quantizer", "cfg": NVFP4}]))
    with pytest.raises(UnsupportedError, match="fuse q_proj/k_proj/v_proj"):
        check_exportable(bad)
    mixed = _configured(tmp_path / "c", _recipe([
        {"quantizer_name": "*weight_quantizer", "cfg": NVFP4}, {"quantizer_name": "*input_quantizer", "cfg": FP8}]))
    with pytest.raises(UnsupportedError, match="W4A8"):
        check_exportable(mixed)
    kv = _configured(tmp_path / "d", _recipe([
        {"quantizer_name": "*layers.0*k_bmm_quantizer", "cfg": FP8},
        {"quantizer_name": "*layers.1*k_bmm_quantizer", "cfg": NVFP4}]))
    with pytest.raises(UnsupportedError, match="mixed KV"):
        check_exportable(kv)
    head = _configured(tmp_path / "e", _recipe([
        {"quantizer_name": "*weight_quantizer", "cfg": FP8}, {"quantizer_name": "*input_quantizer", "cfg": FP8}]))
    assert any("lm_head" in w and "45102" in w for w in check_exportable(head))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        check_exportable(ok, export_dir=tmp_path / "full")
    out = _configured(tmp_path / "f", _recipe([{"quantizer_name": "*o_proj.output_quantizer", "cfg": FP8}]))
    with pytest.raises(UnsupportedError, match="output quantizers"):
        check_exportable(out)


def test_check_exportable_nvfp4_block_divisibility(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "src"))
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    apply_recipe(loaded.model, "general/ptq/nvfp4_default-kv_fp8")
    with pytest.raises(ExportError, match=r"down_proj.*in=72"):
        check_exportable(loaded)
    del torch


def test_multimodal_keeps_non_text_tensors(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=210, boi_token_index=208, eoi_token_index=209)
    import torch

    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "src"))
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 200, (2, 12)).astype(np.int32)
    quantize(loaded.model, "general/ptq/nvfp4_mlp_only-kv_fp8", (ids, np.ones_like(ids)), batch_size=2, progress=False)
    export_hf(loaded, tmp_path / "out")
    src, out = R.tensors_of(tmp_path / "src"), R.tensors_of(tmp_path / "out")
    # transformers writes Gemma 3 in the hub layout (language_model.model.*); the export keeps the source layout
    text = "language_model.model." if any(k.startswith("language_model.model.") for k in src) else "model.language_model."
    non_text = [k for k in src if not k.startswith(text) and "lm_head" not in k]
    assert non_text and any("vision_tower." in k for k in non_text)
    for k in non_text:
        assert out[k] == src[k], k  # name, dtype, shape and bytes unchanged
    assert set(out) - set(src) and all(k.startswith(text) for k in set(out) - set(src))  # only scales added
    assert out[text + "layers.0.mlp.up_proj.weight"][0] == "U8"
    assert out[text + "layers.0.self_attn.q_proj.weight"] == src[text + "layers.0.self_attn.q_proj.weight"]
    assert out[text + "norm.weight"][0] == "BF16"  # the model ran in f32; the source dtype is kept
    assert text + "layers.0.self_attn.k_proj.k_scale" in out
    hq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert text + "layers.0.self_attn*" in hq["exclude_modules"]
    assert not any("vision_tower" in e for e in hq["exclude_modules"])
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in cfg_out
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    assert len(back.extra_tensors) == len(non_text)
    np.testing.assert_array_equal(np.asarray(back.model(jnp.asarray(ids))), np.asarray(back.model(jnp.asarray(ids))))
