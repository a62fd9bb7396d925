"""orbax save / restore of the quantized state: identical logits, bit-exact export tensors."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("orbax.checkpoint")
jnp = pytest.importorskip("jax.numpy")

import _export_modelopt_ref as R  # noqa: E402

from jaxquant.calibration import quantize  # noqa: E402
from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.errors import CheckpointError, ExportError  # noqa: E402
from jaxquant.export import export_hf, restore_orbax, save_orbax  # noqa: E402


@pytest.mark.parametrize("recipe,dtype", [("general/ptq/fp8_qkvo-nvfp4_mlp", "bfloat16"),
                                          ("general/ptq/nvfp4_default-kv_fp8", "float32"),
                                          (("nvfp4", "fp8_affine"), "float32")])  # the K/V bias travels too
def test_orbax_roundtrip(tmp_path, recipe, dtype):
    from jaxquant.recipe import preset_recipe

    recipe = preset_recipe(*recipe) if isinstance(recipe, tuple) else recipe
    R.make_llama(tmp_path / "src", tie=True)
    loaded = load_hf(tmp_path / "src", dtype=getattr(jnp, dtype))
    ids = np.random.default_rng(0).integers(0, 96, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    result = quantize(loaded.model, recipe, (ids, mask), batch_size=2, progress=False)
    ref = np.asarray(loaded.model(jnp.asarray(ids), jnp.asarray(mask)))
    save_orbax(loaded, tmp_path / "ck", resolution=result.resolution)
    meta = json.loads((tmp_path / "ck" / "jaxquant_orbax.json").read_text())
    assert meta["producer"]["name"] == "jaxquant" and meta["recipe_rules"]
    assert meta["quantizers"]["model.layers.0.mlp.up_proj.weight_quantizer"]["config"]["num_bits"] == "e2m1"

    ck = restore_orbax(tmp_path / "ck")
    got = np.asarray(ck.model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, ref)
    assert jnp.dtype(ck.model.dtype) == jnp.dtype(getattr(jnp, dtype))

    export_hf(loaded, tmp_path / "hf")
    hf = R.tensors_of(tmp_path / "hf")
    assert ck.export, "export tensors stored"
    for name, arr in ck.export.items():
        a = np.asarray(arr)
        assert hf[name][1] == a.shape and hf[name][2] == a.tobytes(), name
    # the restored model exports the same checkpoint
    export_hf(ck.loaded, tmp_path / "hf2", source_dir=tmp_path / "src")
    assert R.tensors_of(tmp_path / "hf2") == hf


def test_orbax_refusal_and_incomplete(tmp_path):
    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        save_orbax(loaded, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a complete"):
        restore_orbax(tmp_path / "ck")


def test_orbax_roundtrip_keeps_pre_quant_scale(tmp_path):
    """A SmoothQuant model restores with its pre_quant_scales: identical logits and export."""
    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (4, 12)).astype(np.int32)
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                         {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
                         {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
                         {"quantizer_name": "*lm_head*", "enable": False},
                         {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False}],
           "algorithm": "smoothquant"}
    result = quantize(loaded.model, cfg, (ids, np.ones_like(ids)), batch_size=2, progress=False)
    ref = np.asarray(loaded.model(jnp.asarray(ids), None))
    save_orbax(loaded, tmp_path / "ck", resolution=result.resolution)
    ck = restore_orbax(tmp_path / "ck")
    assert ck.model.model.layers[0].mlp.down_proj.input_quantizer.pre_quant_scale is not None
    np.testing.assert_array_equal(np.asarray(ck.model(jnp.asarray(ids), None)), ref)
    export_hf(loaded, tmp_path / "hf")
    export_hf(ck.loaded, tmp_path / "hf2", source_dir=tmp_path / "src")
    assert R.tensors_of(tmp_path / "hf2") == R.tensors_of(tmp_path / "hf")
