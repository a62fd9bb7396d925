"""``--qformat nvfp4_four_over_six`` (static Four-over-Six weights, mse over multipliers 1.0 and 1.5) against
nvidia-modelopt 0.47's ``mtq.quantize`` on CPU (tiny HF Llama, float32, NVFP4 kernels emulated as in
``test_calibration_local_hessian``), and its export."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def test_preset_equals_modelopt_and_exports(tiny_llama, monkeypatch, tmp_path):
    """Each weight block's amax is its max times 1.0 or 1.5, the same choice as ModelOpt's (both multipliers
    occur); the input amax agree to float32 rounding of the two forwards; the export writes weight_scale_2 = global amax / 1536."""
    from test_calibration_local_hessian import _dynamic_kernel_on_cpu, _ids, _modelopt
    from test_calibration_mse import _static_kernel_on_cpu

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.recipe.presets import preset_recipe

    _static_kernel_on_cpu(monkeypatch)
    _dynamic_kernel_on_cpu(monkeypatch)
    recipe = preset_recipe("nvfp4_four_over_six", "none")
    cfg = recipe.quantize_config()
    tmodel, d = tiny_llama
    ids = _ids()
    ref_model = _modelopt(tmodel, cfg, ids)
    loaded = load_hf(d, dtype=jnp.float32)
    batches = [(ids[i:i + 2].astype(np.int32), np.ones((2, 16), np.int32)) for i in range(0, len(ids), 2)]
    state = quantize(loaded.model, recipe, batches, progress=False).calibration_state
    seen = set()
    for name, mod in ref_model.named_modules():
        for role in ("input", "weight"):
            q = getattr(mod, f"{role}_quantizer", None)
            if q is None or not q.is_enabled:
                continue
            ours = state[f"{name}.{role}_quantizer._amax"]
            ref = q._amax.detach().float().numpy().reshape(ours.shape)
            if role == "input":  # max of torch's vs XLA's float32 activations: equal up to an ulp or so
                np.testing.assert_allclose(ours, ref, rtol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(ours, ref, name)
            if role == "weight":
                bmax = np.abs(mod.weight.detach().float().numpy()).reshape(ours.shape[0], -1, 16).max(-1)
                m4 = ours == bmax * np.float32(1.5)
                assert np.all(m4 | (ours == bmax)), name
                seen |= set(np.where(m4, 1.5, 1.0).ravel().tolist())
    assert seen == {1.0, 1.5}
    from jaxquant.export.hf import export_hf

    export_hf(loaded, tmp_path / "out")
    from test_calibration_mse import _read

    t = _read(next((tmp_path / "out").glob("*.safetensors")))
    base = "model.layers.0.mlp.down_proj"
    g = state[f"{base}.weight_quantizer._global_amax"]
    assert t[f"{base}.weight_scale_2"] == np.float32(g) / np.float32(1536.0)
