"""SVDQuant models at export: the HF export (NVFP4_SVD) is refused before calibration and at export time, naming
why; orbax saves and restores the low-rank factors (identical logits)."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("orbax.checkpoint")
jnp = pytest.importorskip("jax.numpy")

import _export_modelopt_ref as R  # noqa: E402

from jaxquant.calibration import quantize  # noqa: E402
from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.errors import UnsupportedError  # noqa: E402
from jaxquant.export import check_exportable, export_hf, restore_orbax, save_orbax  # noqa: E402
from jaxquant.recipe import apply_recipe, preset_recipe  # noqa: E402


def _loaded(tmp_path):
    R.make_llama(tmp_path / "src", tie=False, dtype="bfloat16")
    return load_hf(tmp_path / "src", dtype=jnp.bfloat16), preset_recipe("nvfp4_svdquant", "none")


def test_svdquant_hf_export_refused_before_calibration(tmp_path):
    """jaxquant ptq's preflight (``check_exportable`` with the recipe's resolution) refuses before calibrating."""
    loaded, recipe = _loaded(tmp_path)
    res = apply_recipe(loaded.model, recipe, warn=False)
    with pytest.raises(UnsupportedError, match="vllm#45333"):
        check_exportable(loaded, res)


@pytest.mark.slow
def test_svdquant_hf_export_refused_and_orbax_keeps_the_branch(tmp_path):
    loaded, recipe = _loaded(tmp_path)
    ids = np.random.default_rng(0).integers(0, 96, (4, 12)).astype(np.int32)
    result = quantize(loaded.model, recipe, (ids, np.ones_like(ids)), batch_size=2, progress=False)
    with pytest.raises(UnsupportedError, match=r"q_proj: svdquant's NVFP4_SVD .*_svdquant_lora_a"):
        export_hf(loaded, tmp_path / "hf")
    ref = np.asarray(loaded.model(jnp.asarray(ids), None).astype(jnp.float32))
    save_orbax(loaded, tmp_path / "ck", resolution=result.resolution)
    ck = restore_orbax(tmp_path / "ck")
    wq = ck.model.model.layers[1].mlp.down_proj.weight_quantizer
    assert wq.svdquant_lora_a.value.shape == (32, 96) and wq.svdquant_lora_b.value.shape == (64, 32)
    np.testing.assert_array_equal(np.asarray(ck.model(jnp.asarray(ids), None).astype(jnp.float32)), ref)
