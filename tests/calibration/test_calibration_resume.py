"""A layerwise calibration interrupted after some layers resumes from its checkpoint (calibration/resume.py) and ends
with the same statistics as an uninterrupted run, bit for bit, without running the finished layers again."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.calibration import quantize, stages
from jaxquant.calibration.resume import FILE_NAME
from jaxquant.errors import CheckpointError, RecipeError, UnsupportedError
from jaxquant.models import ModelConfig, build_model

from test_calibration_stages import CASES  # noqa: E402  (tests/calibration is on sys.path under pytest)

RECIPE = "general/ptq/nvfp4_default-kv_fp8"


class Stop(Exception):
    pass


def _data(config):
    rows = np.random.default_rng(0).integers(1, config.vocab_size, (6, 12)).astype(np.int32)
    mask = np.ones_like(rows)
    mask[0, :5] = 0
    return {"input_ids": rows, "attention_mask": mask}


def _run(config, seed=0, **kw):
    m = build_model(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    return quantize(m, RECIPE, _data(config), batch_size=3, progress=False, **kw).calibration_state


def _counting(monkeypatch, stop_at=None):
    ran = []
    real = stages.StagedStep.run_layer

    def run_layer(self, i, *a, **k):
        if i == stop_at:
            raise Stop(f"killed at layer {i}")
        ran.append(i)
        return real(self, i, *a, **k)

    monkeypatch.setattr(stages.StagedStep, "run_layer", run_layer)
    return ran


@pytest.mark.parametrize("family", ["llama", "gemma4_e2b"])  # gemma4_e2b carries shared KV between layers
def test_interrupted_run_resumes_with_the_same_amax(tmp_path, monkeypatch, family):
    config = ModelConfig.from_hf_config(CASES[family])
    n = config.num_hidden_layers
    want = _run(config, layerwise=True)
    ckpt = tmp_path / "ckpt"
    _counting(monkeypatch, stop_at=2)
    with pytest.raises(Stop):
        _run(config, layerwise_checkpoint=ckpt)
    assert (ckpt / FILE_NAME).is_file()
    monkeypatch.undo()
    ran = _counting(monkeypatch)
    got = _run(config, layerwise_checkpoint=ckpt)  # a fresh process would rebuild the model the same way
    batches = 2
    assert ran == [i for i in range(2, n) for _ in range(batches)]  # layers 0-1 were not run again
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    ran.clear()
    again = _run(config, layerwise_checkpoint=ckpt)  # a finished run's checkpoint: nothing left to run
    assert ran == []
    for k in want:
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(want[k]), err_msg=k)


def test_another_runs_checkpoint_is_refused(tmp_path):
    config = ModelConfig.from_hf_config(CASES["llama"])
    _run(config, layerwise_checkpoint=tmp_path)
    with pytest.raises(CheckpointError, match="belongs to another calibration"):
        _run(config, seed=1, layerwise_checkpoint=tmp_path)  # other weights, same shapes


def test_save_every_and_recipe_options(tmp_path, monkeypatch):
    from jaxquant.calibration.algorithms import parse_layerwise

    assert parse_layerwise({"enable": True, "checkpoint_dir": "d", "save_every": 2}) == {
        "layerwise": True, "layerwise_checkpoint_dir": "d", "layerwise_save_every": 2}
    with pytest.raises(UnsupportedError, match="get_qdq_activations_from_prev_layer"):
        parse_layerwise({"enable": True, "get_qdq_activations_from_prev_layer": True})
    with pytest.raises(UnsupportedError, match="unknown key"):
        parse_layerwise({"enable": True, "offload_dir": "x"})
    with pytest.raises(RecipeError, match="save_every"):
        parse_layerwise({"enable": True, "save_every": 0})
    # save_every 2 on 3 layers: saved after layers 1 and 2 (the last); a stop at layer 1 resumes from the start
    config = ModelConfig.from_hf_config(CASES["llama"])
    from jaxquant.recipe import load_recipe

    recipe = load_recipe(RECIPE).with_entries((), algorithm={
        "method": "max", "layerwise": {"enable": True, "checkpoint_dir": str(tmp_path), "save_every": 2}})
    _counting(monkeypatch, stop_at=1)
    m = build_model(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(Stop):
        quantize(m, recipe, _data(config), batch_size=3, progress=False)
    assert not (tmp_path / FILE_NAME).exists()
