"""Four-over-Six NVFP4 (static blocks, ``four_over_six: true``): fake quant and export bit-exact against ModelOpt's
formulas on CPU (block scales normalised to 256: ``compute_fp4_scales(..., fp8_max_for_normalization=256)``,
``NVFP4QTensor.get_weights_scaling_factor(_2)_from_quantizer`` of a 4/6 quantizer)."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _numerics_ref import (
    DTYPES,
    F32,
    NVFP4QTensor,
    _blocks_np,
    assert_bits_equal,
    mixed_data,
    to_jax,
    to_torch,
    triton_static_np,
)

from jaxquant.formats.registry import get, quantizer_format


def _four_over_six_amax(rng, x):
    """Per-block amax as mse's 4/6 search leaves it: the block max times 1.0 or 1.5, some zero blocks."""
    bmax = np.abs(_blocks_np(x.astype(F32), 16)).max(-1)
    amax = (bmax * rng.choice(np.asarray([1.0, 1.5], F32), bmax.shape)).astype(F32)
    amax[rng.random(amax.shape) < 0.02] = 0.0
    return bmax, amax


def test_fake_quant_equals_modelopt_static_kernel():
    rng = np.random.default_rng(46)
    x = mixed_data(rng, (256, 512), "float32")
    bmax, amax = _four_over_six_amax(rng, x)
    g = F32(bmax.max())
    q = quantizer_format("nvfp4_static_four_over_six")
    ours = q.fake_quant(jnp.asarray(x), jnp.asarray(amax), jnp.float32(g), 16)
    assert_bits_equal(ours, triton_static_np(x, amax, g, fp8_max=256.0), "4/6 static fake quant")
    plain = quantizer_format("nvfp4_static").fake_quant(jnp.asarray(x), jnp.asarray(amax), jnp.float32(g), 16)
    assert np.any(np.asarray(plain) != np.asarray(ours))  # the normalization matters


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_equals_modelopt(dtype):
    rng = np.random.default_rng(47)
    w = mixed_data(rng, (64, 256), dtype)
    bmax, amax = _four_over_six_amax(rng, w)
    g = F32(bmax.max())
    quantizer = SimpleNamespace(block_sizes={-1: 16, "type": "static", "four_over_six": True},
                                _amax=torch.from_numpy(amax), global_amax=torch.tensor(g))
    wt = to_torch(w, dtype)
    wsf, wsf2 = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(quantizer, wt)
    qt, _, _ = NVFP4QTensor.quantize(wt, 16, wsf, wsf2)
    out, _ = get("nvfp4_static_four_over_six").export_tensors_deferred(to_jax(w, dtype), g, block_amax=amax)
    assert_bits_equal(out["weight_scale_2"], wsf2.reshape(()), "4/6 weight_scale_2")
    assert_bits_equal(out["weight_scale"], wsf, "4/6 weight_scale")
    assert_bits_equal(out["weight"], qt._quantized_data, "4/6 packed")
    assert float(out["weight_scale_2"]) == float(g / F32(1536.0))
