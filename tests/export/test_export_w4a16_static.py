"""W4A16 with static NVFP4 weights (mse-searched block amax; Four-over-Six): the export takes the block scales from
the calibrated per-block amax (ModelOpt's ``get_weights_scaling_factor_from_quantizer``), ``quant_algo``
W4A16_NVFP4; it used to fail reshaping the per-block amax as a per-tensor one."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.calibration import quantize
from jaxquant.models import ModelConfig, build_model
from jaxquant.numerics import nvfp4

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
STATIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}


@pytest.mark.parametrize("four_over_six", [False, True], ids=["static", "four_over_six"])
def test_w4a16_static_export(tmp_path, four_over_six):
    from jaxquant.export import export_hf
    from jaxquant.io.safetensors import SafetensorsFile

    wcfg = {**STATIC, "block_sizes": {**STATIC["block_sizes"], "four_over_six": four_over_six}}
    algo = ({"method": "mse", "start_multiplier": 1.0, "stop_multiplier": 1.5, "step_size": 0.5} if four_over_six
            else {"method": "mse", "fp8_scale_sweep": True})
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}, {"quantizer_name": "*weight_quantizer", "cfg": wcfg},
                         {"quantizer_name": "*lm_head*", "enable": False}], "algorithm": algo}
    m = build_model(ModelConfig.from_hf_config(LLAMA), dtype=jnp.float32, rngs=nnx.Rngs(0))
    res = quantize(m, cfg, None, progress=False)
    export_hf(m, tmp_path / "x", resolution=res.resolution, progress=False, hf_config=LLAMA)
    q = json.loads((tmp_path / "x" / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "W4A16_NVFP4"
    f = SafetensorsFile(next((tmp_path / "x").glob("*.safetensors")))
    base = "model.layers.0.mlp.down_proj"
    st = res.calibration_state
    want = nvfp4.quantize(m.model.layers[0].mlp.down_proj.weight[...],
                          global_amax=st[f"{base}.weight_quantizer._global_amax"],
                          block_amax=st[f"{base}.weight_quantizer._amax"],
                          global_divisor=1536.0 if four_over_six else nvfp4.GLOBAL_SCALE_DIVISOR,
                          fp8_norm=nvfp4.FOUR_OVER_SIX_FP8_NORM if four_over_six else 448.0)
    np.testing.assert_array_equal(np.asarray(f.get(f"{base}.weight_scale")).view(np.uint8),
                                  np.asarray(want.block_scale).view(np.uint8))
    assert np.asarray(f.get(f"{base}.weight_scale_2")) == np.asarray(want.global_scale)
    f.close()
