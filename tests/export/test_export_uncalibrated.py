"""Regression (issue 10): an uncalibrated model, or a ``resolution`` that does not describe the model, must not
export. Before: ``apply_recipe`` then ``export_hf`` wrote a valid-looking checkpoint whose input and KV scales were
placeholders (amax 0 -> FP8 scale 1.0, NVFP4 input scale 6/2688), and ``export_hf(model, resolution=r)`` ignored
``r``.

Calibration is tracked in the quantizer state (``TensorQuantizer.UNCALIBRATED``, set by ``configure``), so it
survives calibration-state files and checkpoints, and a calibrated amax of 0 still counts as calibrated.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import _export_modelopt_ref as R  # noqa: E402

RECIPE = "general/ptq/nvfp4_default-kv_fp8"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("uncal") / "src"
    R.make_llama(d, tie=False)
    return d


def _batch():
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    return ids, np.ones_like(ids)


def _load(src):
    import jax.numpy as jnp

    from jaxquant.converters import load_hf

    return load_hf(src, dtype=jnp.float32)


def _configured(src, recipe=RECIPE):
    from jaxquant.recipe import apply_recipe

    loaded = _load(src)
    res = apply_recipe(loaded.model, recipe)
    return loaded, res


def _calibrated(src, recipe=RECIPE):
    from jaxquant.calibration import quantize

    loaded = _load(src)
    result = quantize(loaded.model, recipe, _batch(), batch_size=2, progress=False)
    return loaded, result


def test_apply_recipe_then_export_is_refused_naming_the_quantizer(src, tmp_path):
    from jaxquant.errors import ExportError
    from jaxquant.export import export_hf
    from jaxquant.export.hf import uncalibrated_quantizers

    loaded, _ = _configured(src)
    names = uncalibrated_quantizers(loaded)
    # every weight, input and KV quantizer the recipe enabled
    assert "model.layers.0.self_attn.q_proj.weight_quantizer" in names
    assert "model.layers.1.self_attn.v_bmm_quantizer" in names and "model.layers.1.mlp.up_proj.input_quantizer" in names
    assert not any("lm_head" in n for n in names)  # excluded by the recipe: nothing to calibrate
    with pytest.raises(ExportError) as e:
        export_hf(loaded, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith(f"{names[0]} has no calibrated amax") and f"{len(names) - 1} more" in msg
    assert "jaxquant.quantize(...) or load a calibration state first" in msg
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_weights_calibrated_activations_not_is_refused(src, tmp_path):
    """Weight amax come from the weights alone; the input and KV scales need data."""
    from jaxquant.calibration.max import calibrate_weights
    from jaxquant.calibration.sites import quantizer_sites
    from jaxquant.errors import ExportError
    from jaxquant.export import export_hf
    from jaxquant.export.hf import uncalibrated_quantizers

    loaded, _ = _configured(src)
    calibrate_weights(quantizer_sites(loaded.model), loaded.model)
    names = uncalibrated_quantizers(loaded)
    assert names and all(n.endswith(("input_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")) for n in names)
    with pytest.raises(ExportError, match=names[0].replace(".", r"\.") + " has no calibrated amax"):
        export_hf(loaded, tmp_path / "out")


def test_calibrated_and_state_loaded_models_export_the_same_bytes(src, tmp_path):
    from jaxquant.calibration.state import load_calibration_state
    from jaxquant.export import export_hf
    from jaxquant.export.hf import uncalibrated_quantizers

    loaded, result = _calibrated(src)
    assert uncalibrated_quantizers(loaded) == []
    export_hf(loaded, tmp_path / "a", resolution=result)  # a QuantizeResult is accepted as the resolution

    again, res = _configured(src)
    load_calibration_state(again.model, result.calibration_state)
    assert uncalibrated_quantizers(again) == []
    export_hf(again, tmp_path / "b", resolution=res)
    a, b = R.tensors_of(tmp_path / "a"), R.tensors_of(tmp_path / "b")
    assert a == b and "model.layers.0.self_attn.k_proj.k_scale" in a


def test_a_calibrated_amax_of_zero_counts_as_calibrated(src, tmp_path):
    """Calibration is recorded, not guessed from values: 0 is a legitimate max|x| (all-zero activations)."""
    from jaxquant.calibration.state import load_calibration_state
    from jaxquant.export import export_hf
    from jaxquant.export.hf import uncalibrated_quantizers

    _, result = _calibrated(src)
    state = dict(result.calibration_state)
    state["model.layers.0.mlp.down_proj.input_quantizer._amax"] = np.float32(0.0)
    loaded, _ = _configured(src)
    load_calibration_state(loaded.model, state)
    assert uncalibrated_quantizers(loaded) == []
    export_hf(loaded, tmp_path / "out")


def test_placeholder_survives_a_calibration_state_file(src, tmp_path):
    """A state captured before calibration carries the placeholder; loading it does not make a model calibrated."""
    from jaxquant.calibration.state import (
        calibration_state,
        load_calibration_state,
        read_calibration_state,
        save_calibration_state,
    )
    from jaxquant.errors import ExportError
    from jaxquant.export import export_hf

    first, _ = _configured(src)
    save_calibration_state(tmp_path / "state.safetensors", calibration_state(first.model))
    loaded, _ = _configured(src)
    load_calibration_state(loaded.model, read_calibration_state(tmp_path / "state.safetensors")[0])
    with pytest.raises(ExportError, match="has no calibrated amax"):
        export_hf(loaded, tmp_path / "out")


def test_qat_dynamic_activations_need_finish_qat(src, tmp_path):
    from jaxquant.errors import ExportError
    from jaxquant.export import export_hf
    from jaxquant.qat import finish_qat, prepare_qat

    loaded = _load(src)
    prepare_qat(loaded.model, RECIPE)  # no data: weights calibrated, activations dynamic while training
    with pytest.raises(ExportError, match=r"input_quantizer has no calibrated amax.*finish_qat"):
        export_hf(loaded, tmp_path / "out")
    finish_qat(loaded.model, [_batch()])
    export_hf(loaded, tmp_path / "out")


def test_orbax_export_tensors_refuse_an_uncalibrated_model(src, tmp_path):
    from jaxquant.errors import ExportError
    from jaxquant.export import save_orbax

    loaded, _ = _configured(src)
    with pytest.raises(ExportError, match="has no calibrated amax"):
        save_orbax(loaded, tmp_path / "ck")


def test_resolution_of_another_recipe_is_refused(src, tmp_path):
    from jaxquant.errors import ExportError
    from jaxquant.export import check_exportable, export_hf

    loaded, _ = _calibrated(src)
    _, fp8 = _configured(src, "general/ptq/fp8_default-kv_fp8")
    with pytest.raises(ExportError, match=r"resolution mismatch at model\.layers\.0\.mlp\.down_proj\.input_quantizer: "
                                          r"the resolution says fp8, the model's quantizer is nvfp4"):
        export_hf(loaded, tmp_path / "out", resolution=fp8)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="resolution mismatch"):  # before calibration, too
        check_exportable(_configured(src)[0], fp8)


def test_resolution_disabling_a_quantizer_is_refused(src, tmp_path):
    """Same formats, but the model has one more quantizer enabled than the resolution."""
    from jaxquant.errors import ExportError
    from jaxquant.export import export_hf
    from jaxquant.recipe import apply_recipe

    loaded, result = _calibrated(src)
    other = _load(src)
    res = apply_recipe(other.model, {"quant_cfg": [*(r.to_dict() for r in result.resolution.rules),
                                                   {"quantizer_name": "*layers.1.mlp.up_proj*", "enable": False}],
                                     "algorithm": "max"})
    with pytest.raises(ExportError, match=r"mismatch at model\.layers\.1\.mlp\.up_proj\.input_quantizer: the "
                                          r"resolution says disabled, the model's quantizer is nvfp4"):
        export_hf(loaded, tmp_path / "out", resolution=res)


def test_resolution_of_another_model_is_refused(src, tmp_path):
    from jaxquant.errors import ExportError
    from jaxquant.export import export_hf
    from jaxquant.recipe import apply_recipe

    loaded, _ = _calibrated(src)
    bigger = tmp_path / "bigger"
    R.make_llama(bigger, tie=False)
    import json

    cfg = json.loads((bigger / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items()
                                                               if k not in ("architectures", "transformers_version")})
                                  ).save_pretrained(str(bigger))
    res = apply_recipe(_load(bigger).model, RECIPE)
    with pytest.raises(ExportError, match=r"the resolution names quantizer model\.layers\.2\..*which the model does "
                                          "not have"):
        export_hf(loaded, tmp_path / "out", resolution=res)
    with pytest.raises(ExportError, match="must be the Resolution"):
        export_hf(loaded, tmp_path / "out", resolution="general/ptq/nvfp4_default-kv_fp8")


def test_stacked_experts_are_named_per_expert(tmp_path):
    import torch
    import transformers

    from jaxquant.export.hf import uncalibrated_quantizers

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, intermediate_size=80,
                                      moe_intermediate_size=32, head_dim=16, num_experts=4, num_experts_per_tok=2)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(str(tmp_path / "moe"))
    loaded, _ = _configured(tmp_path / "moe")
    names = uncalibrated_quantizers(loaded)
    for e in range(4):
        assert f"model.layers.0.mlp.experts.{e}.gate_proj.weight_quantizer" in names
    q = loaded.model.model.layers[0].mlp.experts.gate_proj_weight_quantizer
    q.amax.value = q.amax.value.at[1].set(1.0)  # expert 1 given a value, the others still placeholders
    names = uncalibrated_quantizers(loaded)
    assert "model.layers.0.mlp.experts.1.gate_proj.weight_quantizer" not in names
    assert "model.layers.0.mlp.experts.2.gate_proj.weight_quantizer" in names
