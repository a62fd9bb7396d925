"""Straight-through gradients of ``jaxquant.qat.fake_quant`` against hand-computed references and ModelOpt.

The forward value is the quantizer's (bit-exact numerics); the derivatives are ModelOpt's convention:
identity (``pass_through_bwd: true``, its default) or identity inside ``|x| <= amax`` and zero outside
(``pass_through_bwd: false``), and LSQ's gradient for a learnable amax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.numerics import fp8, nvfp4
from jaxquant.qat import amax_per_element, fake_quant
from jaxquant.quantizer import fake_quant_ste

X = np.array([0.0, 0.01, -0.3, 1.0, 1.0625, 2.7, -3.5, 3.49, 5.0, -7.0], np.float32)  # last two beyond amax


def _rand(shape, seed=0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _grad_x(fmt, x, amax, ga=None, pass_through=True, bs=16, cot=None):
    x = jnp.asarray(x)
    cot = jnp.ones_like(x) if cot is None else jnp.asarray(cot)
    return np.asarray(jax.grad(lambda v: jnp.sum(fake_quant(fmt, bs, v, amax, ga, pass_through) * cot))(x))


def _grad_amax(fmt, x, amax, ga=None, bs=16, cot=None):
    x = jnp.asarray(x)
    cot = jnp.ones_like(x) if cot is None else jnp.asarray(cot)
    return np.asarray(jax.grad(lambda a: jnp.sum(fake_quant(fmt, bs, x, a, ga) * cot))(jnp.asarray(amax)))


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_is_the_quantizer_numerics(dtype):
    x = jnp.asarray(_rand((4, 48), 1), dtype)
    for fmt, amax, ga, ref in [
        ("fp8", 3.0, None, fp8.fake_quant(x, 3.0)),
        ("fp8_per_channel", jnp.arange(1, 5, dtype=jnp.float32)[:, None], None,
         fp8.fake_quant(x, jnp.arange(1, 5, dtype=jnp.float32)[:, None])),
        ("nvfp4", 5.0, None, nvfp4.fake_quant_dynamic(x, 5.0)),
        ("nvfp4_static", nvfp4.block_amax(x), jnp.max(nvfp4.block_amax(x)),
         nvfp4.fake_quant_static(x, nvfp4.block_amax(x), jnp.max(nvfp4.block_amax(x)))),
    ]:
        y = fake_quant(fmt, 16, x, amax, ga)
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32), err_msg=fmt)
        np.testing.assert_array_equal(np.asarray(y, np.float32),
                                      np.asarray(fake_quant_ste(fmt, 16, x, amax, ga), np.float32))


# ------------------------------------------------------------------------------------------ d/dx
def test_fp8_reference_vector_and_straight_through():
    y = fake_quant("fp8", 16, jnp.asarray(X), 3.5)
    np.testing.assert_array_equal(
        np.asarray(y)[:8], np.array([0.0, 0.009765625, -0.3125, 1.0, 1.0, 2.75, -3.5, 3.5], np.float32))
    np.testing.assert_array_equal(np.asarray(y)[8:], [3.5, -3.5])  # clipped in the forward pass
    cot = np.arange(1, 11, dtype=np.float32)
    # pass_through_bwd: true -> identity everywhere, also for the two clipped values
    np.testing.assert_array_equal(_grad_x("fp8", X, 3.5, cot=cot), cot)
    # pass_through_bwd: false -> identity inside [-amax, amax], zero outside
    np.testing.assert_array_equal(_grad_x("fp8", X, 3.5, pass_through=False, cot=cot),
                                  np.where(np.abs(X) <= 3.5, cot, 0.0))


def test_clipped_ste_thresholds_per_format():
    x = _rand((3, 40), 2, scale=3.0)  # K=40: 3 blocks, the last one padded
    # per-channel FP8: each row's own amax
    a = np.array([[1.0], [2.0], [50.0]], np.float32)
    np.testing.assert_array_equal(_grad_x("fp8_per_channel", x, a, pass_through=False), np.abs(x) <= a)
    # dynamic NVFP4: the global amax
    np.testing.assert_array_equal(_grad_x("nvfp4", x, 2.5, pass_through=False), np.abs(x) <= 2.5)
    # static NVFP4: each block's amax, repeated over its 16 elements
    ba = np.array([[1.0, 2.0, 3.0], [0.5, 9.0, 1.5], [4.0, 4.0, 0.0]], np.float32)
    per_el = np.repeat(ba, 16, axis=1)[:, :40]
    np.testing.assert_array_equal(np.asarray(amax_per_element("nvfp4_static", 16, ba, x.shape)), per_el)
    np.testing.assert_array_equal(_grad_x("nvfp4_static", x, ba, ga=9.0, pass_through=False),
                                  np.abs(x) <= per_el)
    for fmt, amax, ga in (("fp8_per_channel", a, None), ("nvfp4", 2.5, None), ("nvfp4_static", ba, 9.0)):
        np.testing.assert_array_equal(_grad_x(fmt, x, amax, ga), np.ones_like(x))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gradient_keeps_the_input_dtype(dtype):
    x = jnp.asarray(X, dtype)
    g = jax.grad(lambda v: jnp.sum(fake_quant("nvfp4", 16, v, 3.5).astype(jnp.float32)))(x)
    assert g.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.ones(X.shape, np.float32))


def test_matches_modelopt_autograd():
    """ModelOpt's own ``scaled_e4m3`` backward (CPU), both pass_through_bwd settings, and its clip mask
    for the block formats (``_fake_tensor_quant_backward``, shared by every fake-quant autograd function)."""
    torch = pytest.importorskip("torch")
    tq = pytest.importorskip("modelopt.torch.quantization.tensor_quant")
    x = _rand((4, 32), 3, scale=2.0)
    cot = _rand((4, 32), 4)
    for pt in (True, False):
        for amax in (np.float32(1.5), np.array([[0.5], [1.0], [2.0], [9.0]], np.float32)):
            xt = torch.tensor(x, requires_grad=True)
            yt = tq.scaled_e4m3(xt, torch.tensor(amax), None, 4, 3, None, pt)
            (gt,) = torch.autograd.grad(yt, xt, torch.tensor(cot))
            fmt = "fp8" if np.ndim(amax) == 0 else "fp8_per_channel"
            y = fake_quant(fmt, 16, jnp.asarray(x), amax, None, pt)
            np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy())
            np.testing.assert_array_equal(_grad_x(fmt, x, amax, pass_through=pt, cot=cot), gt.numpy())
    mask = tq._fake_tensor_quant_backward(torch.tensor(x), torch.tensor(1.25), torch.tensor(cot)).numpy()
    np.testing.assert_array_equal(_grad_x("nvfp4", x, 1.25, pass_through=False, cot=cot), mask)


# ------------------------------------------------------------------------------------------ d/damax
def _lsq_reference(x, y, amax_el):
    x, y, a = (np.asarray(v, np.float64) for v in (x, y, amax_el))
    return np.where(np.abs(x) <= a, (y - x) / a, np.sign(x))


def test_lsq_amax_gradient_per_tensor():
    y = np.asarray(fake_quant("fp8", 16, jnp.asarray(X), 3.5))
    cot = np.arange(1, 11, dtype=np.float32)
    ref = np.sum(_lsq_reference(X, y, 3.5) * cot)
    np.testing.assert_allclose(_grad_amax("fp8", X, np.float32(3.5), cot=cot), ref, rtol=1e-6)
    # hand check of two entries: 1.0625 -> 1.0 inside (-0.0625/3.5), -7.0 clipped (-1)
    assert _lsq_reference(X, y, 3.5)[4] == pytest.approx(-0.0625 / 3.5)
    assert _lsq_reference(X, y, 3.5)[9] == -1.0


@pytest.mark.parametrize("fmt", ["fp8_per_channel", "nvfp4", "nvfp4_static"])
def test_lsq_amax_gradient_reduces_over_the_elements_it_scales(fmt):
    x = _rand((3, 40), 5, scale=3.0)
    cot = _rand((3, 40), 6)
    if fmt == "fp8_per_channel":
        amax, ga = np.array([[1.0], [2.0], [5.0]], np.float32), None
    elif fmt == "nvfp4":
        amax, ga = np.float32(4.0), None
    else:
        amax = np.asarray(nvfp4.block_amax(jnp.asarray(x))) * np.float32(0.8)  # some elements clip
        ga = np.float32(amax.max())
    y = np.asarray(fake_quant(fmt, 16, jnp.asarray(x), amax, ga))
    per_el = np.asarray(amax_per_element(fmt, 16, amax, x.shape))
    g_el = _lsq_reference(x, y, np.broadcast_to(per_el, x.shape)) * cot
    if fmt == "fp8_per_channel":
        ref = g_el.sum(axis=1, keepdims=True)
    elif fmt == "nvfp4":
        ref = g_el.sum()
    else:
        ref = np.pad(g_el, ((0, 0), (0, 8))).reshape(3, 3, 16).sum(-1)
    got = _grad_amax(fmt, x, amax, ga, cot=cot)
    assert got.shape == np.shape(amax)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_zero_amax_gives_finite_gradients():
    x = jnp.zeros((2, 16))
    assert np.all(np.isfinite(_grad_amax("fp8", x, np.float32(0.0))))
    assert np.all(np.isfinite(_grad_amax("nvfp4", x, np.float32(0.0))))
    assert np.all(np.isfinite(_grad_x("nvfp4", x, 0.0, pass_through=False)))


def test_amax_tangent_is_not_computed_when_amax_is_not_differentiated():
    """A frozen amax costs nothing in the backward pass (symbolic zero): no float sign op (the amax
    tangent's ``sign(x)`` outside the range; the exact division's integer ``sign`` does not count)."""
    import re

    float_sign = re.compile(r"f32\[[\d,]*\] = sign")
    x = jnp.asarray(_rand((4, 32), 7))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(fake_quant("fp8", 16, v, 2.0))))(x))
    assert not float_sign.search(jaxpr)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: jnp.sum(fake_quant("fp8", 16, x, a))))(2.0))
    assert float_sign.search(jaxpr)
