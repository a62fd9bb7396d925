"""Token embeddings under a recipe, as ModelOpt's ``QuantEmbedding``: the table's ``weight_quantizer`` is resolved
and configured like ModelOpt's (``nvfp4_fp8_mha`` has no ``nn.Embedding`` exclusion), the lookup reads the
fake-quantized table, a quantizer jaxquant's embedding does not hold (the lookup output) warns, and a quantized table
that a tied head reads is refused."""

import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_families import write_tiny_family  # noqa: E402

from jaxquant.errors import UnsupportedError  # noqa: E402
from jaxquant.recipe import apply_recipe, preset_recipe  # noqa: E402
from jaxquant.recipe.apply import EmbeddingNotQuantizedWarning  # noqa: E402

FP8 = {"num_bits": (4, 3), "axis": None}
EMB = "model.embed_tokens.weight_quantizer"


def _load(tmp_path_factory, family):
    from jaxquant.converters import load_hf

    return load_hf(write_tiny_family(family, tmp_path_factory.mktemp(family) / "ck"), dtype=jnp.float32)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _load(tmp_path_factory, "llama")


def test_an_enabled_embedding_rule_configures_the_table_quantizer(tiny_llama):
    bare = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": FP8}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingNotQuantizedWarning)
        res = apply_recipe(tiny_llama.model, bare)
    assert res.configs[EMB].num_bits == (4, 3)
    assert tiny_llama.model.model.embed_tokens.weight_quantizer.format == "fp8"
    excluded = {"quant_cfg": bare["quant_cfg"] + [{"quantizer_name": "*", "parent_class": "nn.Embedding",
                                                   "enable": False}]}
    res = apply_recipe(tiny_llama.model, excluded)
    assert res.configs[EMB] is None and not tiny_llama.model.model.embed_tokens.weight_quantizer.enabled
    res = apply_recipe(tiny_llama.model, "general/ptq/fp8_default-kv_fp8")  # ModelOpt's recipes exclude it
    assert res.configs[EMB] is None


def test_an_enabled_embedding_output_rule_warns(tiny_llama):
    """ModelOpt's embedding has an output quantizer; jaxquant's has none, so a recipe enabling it is told so."""
    rules = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                           {"quantizer_name": "*output_quantizer", "cfg": FP8}]}
    with pytest.warns(EmbeddingNotQuantizedWarning, match=r"model\.embed_tokens\.output_quantizer \(fp8\)"):
        apply_recipe(tiny_llama.model, rules, warn=True)


def test_nvfp4_fp8_mha_resolves_every_quantizer_like_modelopt(tiny_llama):
    """jaxquant's quantizers of a Llama under the preset, against ModelOpt's ``set_quantizer_by_cfg`` on the same
    transformers model converted by ModelOpt (the embedding table's quantizer included)."""
    pytest.importorskip("modelopt.torch.quantization")
    import transformers
    from _recipe_oracle import TorchOracle, our_attrs
    from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES
    from modelopt.torch.quantization.conversion import replace_quant_module
    import modelopt.torch.quantization as mtq

    torch_model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_llama.source_dir))
    replace_quant_module(torch_model)
    cfg = mtq.update_quant_cfg_with_kv_cache_quant(QUANT_CFG_CHOICES["nvfp4_fp8_mha"],
                                                   KV_QUANT_CFG_CHOICES["fp8"]["quant_cfg"])
    expected = TorchOracle("llama", torch_model).apply(cfg["quant_cfg"])
    res = apply_recipe(tiny_llama.model, preset_recipe("nvfp4_fp8_mha", "fp8"), warn=False)
    got = {n: our_attrs(c) for n, c in res.configs.items()}
    assert got[EMB] is not None and got[EMB] == expected[EMB]  # NVFP4, dynamic blocks of 16, E4M3 scales
    assert got["lm_head.weight_quantizer"] is not None  # the preset has no lm_head exclusion either
    for name, attrs in got.items():
        assert attrs == expected[name], name
    missing = {n for n, a in expected.items() if a is not None} - set(got)
    # ModelOpt's attention quantizers jaxquant does not hold: P's twin for eager attention, not a tensor here
    assert missing <= {n for n in expected if n.endswith("softmax_quantizer")}, missing


def test_the_lookup_reads_the_fake_quantized_table(tiny_llama):
    """Max calibration sets the table's amax to max |W| (ModelOpt's weight calibration) and the lookup returns
    rows of the NVFP4 fake-quantized table: against the numpy emulation of ModelOpt's dynamic NVFP4 kernel."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "numerics"))
    from _numerics_ref import triton_dynamic_np

    from jaxquant.calibration.max import calibrate_weights, set_quant_mode
    from jaxquant.calibration.sites import quantizer_sites

    model = tiny_llama.model
    apply_recipe(model, preset_recipe("nvfp4_fp8_mha", "fp8"), warn=False)
    emb = model.model.embed_tokens
    calibrate_weights(quantizer_sites(model))
    w = np.asarray(emb.weight[...], np.float32)
    assert float(emb.weight_quantizer.amax.value) == np.abs(w).max()
    set_quant_mode(model, "fake_quant")
    ids = np.array([[0, 5, 7, 5], [3, 2, 1, 9]], np.int32)
    want = triton_dynamic_np(w, np.abs(w).max())[ids]
    np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(ids))), want)
    assert np.abs(want - w[ids]).max() > 0  # really quantized
    set_quant_mode(model, "off")
    np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(ids))), w[ids])


def test_a_quantized_table_read_by_a_tied_head_is_refused(tmp_path_factory):
    tied = _load(tmp_path_factory, "qwen2")  # tie_word_embeddings: the head is embed_tokens.attend
    assert tied.model.lm_head is None
    with pytest.raises(UnsupportedError, match=r"model\.embed_tokens\.weight_quantizer \(nvfp4\).*tied"):
        apply_recipe(tied.model, preset_recipe("nvfp4_fp8_mha"), warn=False)
    apply_recipe(tied.model, preset_recipe("nvfp4"), warn=False)  # the table excluded: fine


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq_lite"])
def test_the_linear_passes_skip_the_table_which_keeps_its_max_amax(tiny_llama, algorithm):
    """ModelOpt's ``is_quantized_linear`` is False for an nn.Embedding, so SmoothQuant / AWQ never smooth the table;
    their max calibration gives it the max over the table (per row for a per-channel weight)."""
    from jaxquant.calibration import quantize

    fmt = ({"num_bits": 8, "axis": 0} if algorithm == "smoothquant"
           else {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}})
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                         {"quantizer_name": "*weight_quantizer", "cfg": fmt},
                         {"quantizer_name": "*lm_head*", "enable": False}], "algorithm": algorithm}
    if algorithm == "smoothquant":
        cfg["quant_cfg"].insert(2, {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    ids = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32)
    quantize(tiny_llama.model, cfg, (ids, np.ones_like(ids)), batch_size=2, progress=False)
    q = tiny_llama.model.model.embed_tokens.weight_quantizer
    w = np.abs(np.asarray(tiny_llama.model.model.embed_tokens.weight[...], np.float32))
    want = w.max(axis=1) if algorithm == "smoothquant" else w.reshape(w.shape[0], -1, 32).max(-1)
    np.testing.assert_array_equal(np.asarray(q.amax.value).reshape(want.shape), want)
    assert q.pre_quant_scale is None  # not smoothed
    assert tiny_llama.model.model.layers[0].mlp.down_proj.weight_quantizer.enabled
