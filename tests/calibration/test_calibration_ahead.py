"""Ahead-of-time compilation of the calibration (``calibration/ahead.py``): the executables compiled from the
config alone are the ones the real model's calibration runs, and the results are the same bits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.calibration import ahead, quantize
from jaxquant.calibration.ahead import compile_calibration_ahead
from jaxquant.models import ModelConfig, build_model
from jaxquant.recipe import load_recipe

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
RECIPE = "general/ptq/nvfp4_default-kv_fp8"


def _calibrate(config, rows, use_ahead: bool, monkeypatch):
    ahead.clear()
    recipe = load_recipe(RECIPE)
    if use_ahead:
        r = compile_calibration_ahead(config, jnp.float32, recipe, rows.shape[1], 4)
        # weights of the rest and of a layer, prologue, one layer for both layers, epilogue
        assert r.compiled == 5 and r.batch_size == 4
    compiled = []
    real_store = ahead.store
    monkeypatch.setattr(ahead, "store", lambda k, e: (compiled.append(k[0]), real_store(k, e)))
    m = build_model(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    res = quantize(m, recipe, {"input_ids": rows, "attention_mask": np.ones_like(rows)}, batch_size=4,
                   progress=False)
    monkeypatch.undo()
    return res.calibration_state, compiled


def test_ahead_executables_are_used_and_give_the_same_bits(monkeypatch):
    config = ModelConfig.from_hf_config(LLAMA)
    rows = np.random.default_rng(0).integers(1, 101, (8, 16)).astype(np.int32)
    plain, compiled_plain = _calibrate(config, rows, False, monkeypatch)
    early, compiled_early = _calibrate(config, rows, True, monkeypatch)
    # without: compiled during quantize, the two equal layers once
    assert sorted(compiled_plain) == ["epilogue", "layer", "prologue", "weights", "weights"]
    assert compiled_early == []  # with: all found in the store
    assert plain.keys() == early.keys()
    for k in plain:
        np.testing.assert_array_equal(np.asarray(plain[k]), np.asarray(early[k]), err_msg=k)


def test_compile_all_reports_when_every_job_is_lowered():
    """``compile_all`` lowers the misses on the calling thread (compiling each on a pool thread as soon as it is
    lowered), calls ``on_lowered`` once after the last lowering, compiles equal keys and stored keys not again."""
    ahead.clear()
    events = []

    class Lowered:
        def __init__(self, k):
            self.k = k

        def compile(self):
            events.append(("compile", self.k))
            return f"exe-{self.k}"

    def job(k):
        return (("test-job", k), lambda: (events.append(("lower", k)), Lowered(k))[1])

    ahead.store(("test-job", "stored"), "exe-stored")
    exes = ahead.compile_all([job(0), job(1), job(0), job("stored"), job(2)],
                             on_lowered=lambda: events.append(("on_lowered", None)))
    assert exes == ["exe-0", "exe-1", "exe-0", "exe-stored", "exe-2"]
    lowers = [e for e in events if e[0] == "lower"]
    assert lowers == [("lower", 0), ("lower", 1), ("lower", 2)]
    assert events.count(("on_lowered", None)) == 1
    assert events.index(("on_lowered", None)) > events.index(("lower", 2))
    assert sorted(k for e, k in events if e == "compile") == [0, 1, 2]
    ahead.clear()


def test_on_lowered_comes_once_and_on_failure():
    """``compile_calibration_ahead`` calls ``on_lowered`` (what lets ``jaxquant ptq`` start reading weights,
    ``cli_overlap.LOAD_AFTER_LOWERING``) once, and also when its Python part fails, so that a loader waiting on it is
    never left waiting."""
    import pytest

    config = ModelConfig.from_hf_config(LLAMA)
    ahead.clear()
    events = []
    r = compile_calibration_ahead(config, jnp.float32, load_recipe(RECIPE), 16, 4,
                                  on_lowered=lambda: events.append("lowered"))
    assert events == ["lowered"] and r.compiled == 5
    events.clear()
    with pytest.raises(Exception, match="no_such_recipe"):
        compile_calibration_ahead(config, jnp.float32, "general/ptq/no_such_recipe", 16, 4,
                                  on_lowered=lambda: events.append("lowered"))
    assert events == ["lowered"]


def test_a_different_batch_shape_misses_and_compiles(monkeypatch):
    config = ModelConfig.from_hf_config(LLAMA)
    ahead.clear()
    compile_calibration_ahead(config, jnp.float32, load_recipe(RECIPE), 32, 4)  # guessed 32 tokens per row
    rows = np.random.default_rng(1).integers(1, 101, (8, 16)).astype(np.int32)
    compiled = []
    real_store = ahead.store
    monkeypatch.setattr(ahead, "store", lambda k, e: (compiled.append(k[0]), real_store(k, e)))
    m = build_model(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    quantize(m, RECIPE, {"input_ids": rows, "attention_mask": np.ones_like(rows)}, batch_size=4, progress=False)
    assert sorted(compiled) == ["epilogue", "layer", "prologue"]  # the weight reduction still matched


def test_store_is_bounded():
    ahead.clear()
    for i in range(ahead.MAX_STORED + 3):
        ahead.store(("k", i), i)
    assert ahead.lookup(("k", 0)) is None
    assert ahead.lookup(("k", ahead.MAX_STORED + 2)) == ahead.MAX_STORED + 2
    ahead.clear()


def test_export_kernels_warmed_ahead_are_the_ones_export_calls(tmp_path):
    """``export_dtype``: the export's jitted kernels, run once on zeros from the abstract model, are found in
    JAX's cache by ``export_hf`` (no new compilation during the export)."""
    from jaxquant.export import export_hf
    from jaxquant.formats import fp8, nvfp4

    config = ModelConfig.from_hf_config(LLAMA)
    recipe = "general/ptq/fp8_qkvo-nvfp4_mlp"
    fp8._export.clear_cache()
    nvfp4._export.clear_cache()
    r = compile_calibration_ahead(config, jnp.bfloat16, load_recipe(recipe), 16, 4, export_dtype=jnp.bfloat16)
    # weights (rest, layer), prologue, layer, epilogue; FP8: q/o [32, 32], k/v [16, 32]; NVFP4: gate/up, down
    assert r.compiled == 5 + 4
    m = build_model(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rows = np.random.default_rng(0).integers(1, 101, (8, 16)).astype(np.int32)
    res = quantize(m, recipe, {"input_ids": rows, "attention_mask": np.ones_like(rows)}, batch_size=4,
                   progress=False)
    warmed = (fp8._export._cache_size(), nvfp4._export._cache_size())
    export_hf(m, tmp_path / "x", resolution=res.resolution, progress=False, hf_config=LLAMA)
    assert (fp8._export._cache_size(), nvfp4._export._cache_size()) == warmed
