"""Export tensors byte-for-byte against nvidia-modelopt's own export functions (CPU)."""

import _numpy_export_ref as T  # the numpy oracle (formerly jaxquant/export/tensors.py)
import ml_dtypes
import numpy as np
import pytest

from jaxquant.errors import ExportError, NonFiniteError

torch = pytest.importorskip("torch")
nvfp4_mod = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
qu = pytest.importorskip("modelopt.torch.export.quant_utils")
NVFP4QTensor = nvfp4_mod.NVFP4QTensor


def _u8(t):
    return t.contiguous().view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy()


def _weights(seed, shape=(64, 128), dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :16] = 0.0  # an all-zero block
    w[1, 16:32] *= 1e-4  # a tiny block (scale clamped up to 2^-9)
    w[2, 5] = 0.9  # an outlier
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fp8_weight_matches_modelopt(dtype):
    for seed in range(3):
        w = _weights(seed, dtype=dtype)
        amax = w.float().abs().amax()
        scale_ref = torch.tensor(amax.item() / 448.0)
        q_ref = qu.to_quantized_weight(w, scale_ref, "fp8")
        q, scale = T.fp8_weight(_np(w), amax.numpy())
        assert scale.dtype == np.float32 and scale.shape == ()
        assert scale.tobytes() == scale_ref.numpy().tobytes()
        assert q.dtype == ml_dtypes.float8_e4m3fn
        np.testing.assert_array_equal(q.view(np.uint8), _u8(q_ref))


def _np(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def test_fp8_per_channel_matches_modelopt():
    w = _weights(1, dtype=torch.float32)
    amax = w.abs().amax(dim=1)
    scale_ref = amax / 448.0
    q_ref = qu.to_quantized_weight(w, scale_ref, "fp8_pc_pt")
    q, scale = T.fp8_weight(w.numpy(), amax.numpy())
    np.testing.assert_array_equal(scale, scale_ref.numpy())
    np.testing.assert_array_equal(q.view(np.uint8), _u8(q_ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_weight_matches_modelopt(dtype):
    for seed in range(3):
        w = _weights(seed, dtype=dtype)
        amax = w.float().abs().amax() * (1.0 if seed else 1.7)  # seed 0: a unified (larger) sibling amax
        wsf2 = amax.float() / (6.0 * 448.0)
        wsf = NVFP4QTensor.get_weights_scaling_factor(w, 16, wsf2)[0]
        packed_ref = qu.to_quantized_weight(w, wsf, "nvfp4", wsf2, 16)
        packed, scale, scale2 = T.nvfp4_weight(_np(w), amax.numpy())
        assert packed.dtype == np.uint8 and packed.shape == (64, 64)
        assert scale.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (64, 8)
        assert scale2.dtype == np.float32 and scale2.shape == ()
        np.testing.assert_array_equal(scale.view(np.uint8), _u8(wsf))
        assert scale2.tobytes() == wsf2.numpy().tobytes()
        np.testing.assert_array_equal(packed, packed_ref.numpy())
        deq_ref = NVFP4QTensor(w.shape, torch.float32, packed_ref).dequantize(
            dtype=torch.float32, scale=wsf, double_scale=wsf2, block_sizes={-1: 16})
        np.testing.assert_array_equal(T.nvfp4_dequantize(packed, scale, scale2), deq_ref.numpy())


def test_nvfp4_static_matches_modelopt():
    w = _weights(4, dtype=torch.float32)
    block_amax = w.abs().reshape(64, 8, 16).amax(-1) * 0.9  # e.g. an MSE-searched per-block amax
    global_amax = block_amax.max()

    class Q:  # the attributes NVFP4QTensor reads from a static quantizer
        _amax = block_amax
        global_amax = None
        block_sizes = {-1: 16}

    Q.global_amax = global_amax
    wsf2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(Q)
    wsf = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(Q, w, wsf2)[0]
    packed_ref = qu.to_quantized_weight(w, wsf, "nvfp4", wsf2, 16)
    packed, scale, scale2 = T.nvfp4_weight(w.numpy(), global_amax.numpy(), block_amax=block_amax.numpy())
    np.testing.assert_array_equal(scale.view(np.uint8), _u8(wsf))
    assert scale2.tobytes() == wsf2.numpy().tobytes()
    np.testing.assert_array_equal(packed, packed_ref.numpy())


def test_nvfp4_spec_reference_vector():
    w = np.stack([np.linspace(-3.0, 3.5, 32), np.linspace(-0.02, 0.05, 32) * np.cos(np.arange(32))]).astype(np.float32)
    w = torch.from_numpy(w).numpy()  # same float32 values as the spec's torch construction
    packed, scale, scale2 = T.nvfp4_weight(w, np.abs(w).max())
    assert float(scale2) == pytest.approx(0.0013020833721384406, rel=0, abs=0)
    assert scale.view(np.uint8).tolist() == [[124, 126], [66, 76]]
    assert packed[0].tolist() == [255, 239, 238, 221, 205, 188, 154, 24, 33, 51, 68, 85, 101, 102, 118, 119]


def test_e2m1_codes_reference():
    x = np.array([0, .24, .25, .26, .74, .75, .76, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6, 7], np.float32)
    assert T.e2m1_codes(x).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 4, 4, 6, 6, 7, 7, 7]
    assert T.e2m1_codes(np.array([-0.25, -0.75, -5, -7, -0.0], np.float32)).tolist() == [8, 10, 14, 15, 0]
    x = torch.linspace(-7, 7, 2001)
    assert T.e2m1_codes(x.numpy().copy()).tolist() == NVFP4QTensor._cast_fp4(x.clone()).tolist()


def test_activation_and_kv_scales_match_modelopt():
    for amax in (0.37, 5.0, 1234.5):
        a = torch.tensor(amax)
        assert T.fp8_input_scale(a.numpy()).tobytes() == (a.float() / 448.0).numpy().tobytes()
        assert T.nvfp4_input_scale(a.numpy()).tobytes() == (a.float() / (6.0 * 448.0)).numpy().tobytes()
        assert T.kv_scale(a.numpy()).tobytes() == (a.float() / 448).numpy().tobytes()


def test_zero_amax_gives_finite_scales():
    z = np.zeros((4, 32), np.float32)
    q, s = T.fp8_weight(z, np.float32(0))
    assert s == np.float32(1.0) and not q.astype(np.float32).any()
    p, s1, s2 = T.nvfp4_weight(z, np.float32(0))
    assert np.isfinite(s1.astype(np.float32)).all() and s2 == np.float32(6.0) / np.float32(2688.0) and not p.any()
    assert float(T.fp8_input_scale(0.0)) == 1.0
    assert float(T.kv_scale(0.0)) == 1.0


def test_non_finite_named():
    w = np.ones((4, 32), np.float32)
    w[1, 3] = np.nan
    with pytest.raises(NonFiniteError, match="layers.3.mlp.up_proj.weight: 1 of 128"):
        T.nvfp4_weight(w, np.float32(1), what="layers.3.mlp.up_proj.weight")
    with pytest.raises(NonFiniteError, match="amax"):
        T.fp8_input_scale(np.inf, what="q_proj input amax")
    with pytest.raises(ExportError, match="multiple of the NVFP4 block"):
        T.nvfp4_weight(np.ones((2, 24), np.float32), 1.0)


def test_stacked_experts():
    w = np.random.default_rng(0).standard_normal((3, 8, 32)).astype(np.float32)
    amax = np.abs(w).reshape(3, -1).max(-1)
    p, s, s2 = T.nvfp4_weight(w, amax)
    for e in range(3):
        pe, se, s2e = T.nvfp4_weight(w[e], amax[e])
        assert (p[e] == pe).all() and (s[e].view(np.uint8) == se.view(np.uint8)).all() and s2[e] == s2e
    q, sc = T.fp8_weight(w, amax)
    for e in range(3):
        qe, sce = T.fp8_weight(w[e], amax[e])
        assert (q[e].view(np.uint8) == qe.view(np.uint8)).all() and sc[e] == sce


def test_same_bytes_as_numerics_quantize():
    """The host export formulas agree with jaxquant.numerics' jitted export quantizers (float32 weights;
    for bf16 weights ours also reproduces ModelOpt's rounding of w/scale to bf16 before the E4M3 cast)."""
    fp8 = pytest.importorskip("jaxquant.numerics.fp8")
    nvfp4 = pytest.importorskip("jaxquant.numerics.nvfp4")
    rng = np.random.default_rng(1)
    for amax_mult, zero in ((1.0, False), (1.5, False), (1.0, True)):
        w = (rng.standard_normal((32, 64)) * 0.05).astype(np.float32)
        if zero:
            w[:] = 0
        amax = np.float32(np.abs(w).max() * amax_mult)
        q, s = T.fp8_weight(w, amax)
        qa, sa = fp8.quantize(w, amax)
        assert np.asarray(qa).view(np.uint8).tobytes() == q.view(np.uint8).tobytes()
        assert np.asarray(sa).tobytes() == s.tobytes()
        p, s1, s2 = T.nvfp4_weight(w, amax)
        t = nvfp4.quantize(w, global_amax=amax)
        assert np.asarray(t.packed).tobytes() == p.tobytes()
        assert np.asarray(t.block_scale).view(np.uint8).tobytes() == s1.view(np.uint8).tobytes()
        assert np.asarray(t.global_scale).tobytes() == s2.tobytes()
