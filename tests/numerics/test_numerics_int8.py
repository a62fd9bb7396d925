"""INT8 fake quant against ModelOpt's own ``_tensor_quant`` (CPU), bit for bit; the export quantizer against the
formula of ModelOpt's ``to_quantized_weight`` INT8 branch."""

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tq = pytest.importorskip("modelopt.torch.quantization.tensor_quant")

import jax.numpy as jnp  # noqa: E402

from jaxquant.numerics import int8  # noqa: E402


def _weights(rng, rows=768, cols=1536):
    w = (rng.standard_normal((rows, cols)) * rng.lognormal(0, 2, (rows, 1))).astype(np.float32)
    w[3] = 0.0                      # zero channel: amax 0
    w[5] *= 1e-30                   # amax below 2^-24: quantizes to (signed) zero
    w[7, :6] = [0.5, -0.5, 1.5, 2.5, -2.5, 127.5]  # ties
    return w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fake_quant_matches_modelopt_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    w = _weights(rng)  # 1.18 M elements
    tdt = getattr(torch, dtype)
    wt = torch.from_numpy(w).to(tdt)
    amax = wt.float().abs().amax(1, keepdim=True)
    amax[9] = amax[9] / 3  # a clipped channel (|x| > amax saturates at -128 / 127)
    amax[7] = 2.0           # x * 127 / 2 lands on .5 ties
    ref = tq._tensor_quant(wt, amax.to(tdt), 8, False, False).float().numpy()
    x = jnp.asarray(wt.float().numpy()).astype(getattr(jnp, dtype))
    ours = np.asarray(int8.fake_quant(x, jnp.asarray(amax.to(tdt).float().numpy())), np.float32)
    np.testing.assert_array_equal(ours.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_quantize_matches_modelopt_export_formula(dtype):
    """ModelOpt: ``ws = export_amax / 127`` (0 -> 127), ``q = (w.to(dtype) / ws[:, None]).round().clamp(-128, 127)``."""
    rng = np.random.default_rng(1)
    w = _weights(rng).astype(dtype)
    amax = np.abs(w.astype(np.float32)).max(1, keepdims=True)
    wt = torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16 if dtype is ml_dtypes.bfloat16 else torch.float32)
    a = torch.from_numpy(amax[:, 0].copy())
    a = torch.where(a == 0, torch.tensor(127.0), a)
    ws = a.float() / 127.0
    ref_q = (wt / ws[:, None]).round().clamp(-128, 127).to(torch.int8).numpy()
    q, scale = int8.quantize(jnp.asarray(w), jnp.asarray(amax))
    np.testing.assert_array_equal(np.asarray(scale)[:, 0], ws.numpy())
    np.testing.assert_array_equal(np.asarray(q), ref_q)
    back = np.asarray(int8.dequantize(q, scale, jnp.float32))
    np.testing.assert_array_equal(back, ref_q.astype(np.float32) * ws.numpy()[:, None])
