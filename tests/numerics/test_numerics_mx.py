"""MXFP8 numerics against nvidia-modelopt's own ``MXFP8QTensor`` (its export and reference quantizer, CPU), bit for
bit: E8M0 scale bytes, E4M3 codes and the dequantized values, for fp32 and bf16 weights (>1M elements), zero blocks,
subnormal elements and blocks, saturation, and block maxima placed on and just above powers of two, where the
float32 rounding of ``log2`` decides the exponent. Also the exact power-of-two product helper."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxquant.numerics import mx  # noqa: E402
from jaxquant.numerics._exact import mul_pow2  # noqa: E402


def _modelopt(w: "torch.Tensor"):
    qt, scale = qtensor.MXFP8QTensor.quantize(w)
    codes = qt._quantized_data.view(torch.uint8).numpy()
    return scale.numpy(), codes, qt.dequantize(scale=scale, dtype=torch.float32).numpy()


def _assert_same(w: "torch.Tensor", dtype) -> None:
    ref_scale, ref_codes, ref_dq = _modelopt(w)
    x = jnp.asarray(w.float().numpy()).astype(dtype)
    q, scale = mx.quantize(x)
    np.testing.assert_array_equal(np.asarray(scale), ref_scale)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), ref_codes)
    np.testing.assert_array_equal(np.asarray(mx.dequantize(q, scale), np.float32).view(np.uint32), ref_dq.view(np.uint32))
    fq = np.asarray(mx.fake_quant(x), np.float32)  # fake quant = the checkpoint's dequantized weight
    np.testing.assert_array_equal(fq.view(np.uint32), ref_dq.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp8_matches_modelopt_on_a_million_weights(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 2048, generator=g) * torch.logspace(-6, 4, 512)[:, None]
    w[:4, :64] = 0                                  # zero blocks: exponent -127, codes 0
    w[10, :32] = torch.tensor([448.0, -448.0] * 16)  # amax exactly 448 * 2^0
    w[11, :32] = 1e-39                               # an all-subnormal block
    w[12, 5] = 3e-41                                 # a subnormal element among normal ones
    _assert_same(w.to(getattr(torch, dtype)), getattr(jnp, dtype))


def test_mxfp8_block_maxima_on_and_above_powers_of_two():
    """amax / 448 = 2^k (1 + m 2^-23): for small m torch's float32 log2 rounds to k, the exponent is k and the
    block maximum saturates at 448; from some m on it is k + 1. Every k of the E8M0 range."""
    ks, ms = np.arange(-125, 128), np.arange(0, 60)
    for base in (448.0, 448.0 * 0.999, 1.0):
        with np.errstate(over="ignore"):
            amax = (base * np.ldexp(1 + ms[None, :] * 2.0**-23, ks[:, None])).astype(np.float32).reshape(-1)
        amax = amax[np.isfinite(amax)]
        w = np.zeros((amax.size, 32), np.float32)
        w[:, 0], w[:, 1], w[:, 2] = amax, -amax * 0.3, amax * 1e-3
        _assert_same(torch.from_numpy(w), jnp.float32)


def test_fake_quant_pads_a_partial_last_block_with_zeros():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 100, generator=g)
    ref = _modelopt(w)[2]  # ModelOpt's quantize pads to a multiple of 32 and crops
    ours = np.asarray(mx.fake_quant(jnp.asarray(w.numpy())))
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_mul_pow2_is_the_exact_product_with_subnormals():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    k = rng.integers(-160, 160, size=x.shape).astype(np.int32)
    ours = np.asarray(jax.jit(mul_pow2)(x, k))
    with np.errstate(over="ignore"):
        ref = np.ldexp(x.astype(np.float64), k).astype(np.float32)  # exact product, rounded once
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def _modelopt_fp4(w: "torch.Tensor"):
    qt, scale = qtensor.MXFP4QTensor.quantize(w, 32)
    dq = qt.dequantize(dtype=torch.float32, scale=scale, block_sizes={-1: 32}).numpy()
    return scale.numpy().reshape(*w.shape[:-1], -1), qt._quantized_data.numpy(), dq


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_matches_modelopt_on_a_million_weights(dtype):
    """MXFP4QTensor: ties round toward zero, zeros are stored as -0 (code 8); packed bytes, E8M0 bytes and the
    dequantized values (signed zeros included) equal jaxquant's."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 2048, generator=g) * torch.logspace(-6, 4, 512)[:, None]
    w[:4, :64] = 0
    w[20, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])  # every tie; amax 6 -> exponent 0
    w[21, :32] = 1e-39
    w = w.to(getattr(torch, dtype))
    ref_scale, ref_packed, ref_dq = _modelopt_fp4(w)
    x = jnp.asarray(w.float().numpy()).astype(getattr(jnp, dtype))
    packed, scale = mx.quantize_fp4(x)
    np.testing.assert_array_equal(np.asarray(scale), ref_scale)
    np.testing.assert_array_equal(np.asarray(packed), ref_packed)
    dq = np.asarray(mx.dequantize_fp4(packed, scale), np.float32)
    np.testing.assert_array_equal(dq.view(np.uint32), ref_dq.view(np.uint32))
    fq = np.asarray(mx.fake_quant_fp4(x), np.float32)
    np.testing.assert_array_equal(fq.view(np.uint32), ref_dq.astype(np.float32).view(np.uint32))
