"""MXINT8 / MXFP6 (E3M2, E2M3) fake quant against an independent numpy reference of ModelOpt's fused MX kernel.

nvidia-modelopt 0.47 quantizes these only in its CUDA kernel (``tensor_quant_mx.cu``; no CPU path, no export), so
the oracle here is written from that kernel's stated arithmetic with different means: the exponent from
``frexp`` (``ceil(log2(amax / elem_max))`` clamped to [-127, 127]), the FP6 elements from ml_dtypes' float6 casts
(round to nearest even, saturated), INT8 from ``rint``; numpy's float32 division and ``ldexp`` keep subnormals.
Over 1M elements per element format and dtype, plus zeros, subnormals, saturation, infinities, NaN, exact powers
of two at the E8M0 boundaries, block tails and blocks of 8 / 16 / 32."""

import ml_dtypes
import numpy as np
import pytest

import jax.numpy as jnp

from jaxquant.numerics import mx_kernel

BF16 = np.dtype(ml_dtypes.bfloat16)
F32_MAX = np.float32(np.finfo(np.float32).max)
F6 = {"e3m2": ml_dtypes.float6_e3m2fn, "e2m3": ml_dtypes.float6_e2m3fn}


def reference(x: np.ndarray, element: str, block: int = 32) -> np.ndarray:
    """The kernel's arithmetic in numpy (float32 ``x``; result float32)."""
    elem_max = np.float32(mx_kernel.ELEMENTS[element][0])
    n = x.shape[-1]
    nb = -(-n // block)
    xb = np.zeros(x.shape[:-1] + (nb * block,), np.float32)
    xb[..., :n] = x
    xb = xb.reshape(*x.shape[:-1], nb, block)
    mag = np.abs(xb)
    amax = np.minimum(np.where(np.isnan(mag), np.float32(0), mag), F32_MAX).max(-1, keepdims=True)
    with np.errstate(under="ignore"):
        r = (amax / elem_max).astype(np.float32)
    m, k = np.frexp(r)
    e = np.where(m == 0.5, k - 1, k)
    e = np.where(r == 0, -127, np.clip(e, -127, 127))
    e = np.where(amax == 0, 0, e).astype(np.int32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        y = np.ldexp(mag, -e).astype(np.float32)
        if element == "int8":
            q = np.minimum(np.rint(np.minimum(y, elem_max)), elem_max).astype(np.float32)
        else:
            q = np.minimum(np.where(np.isnan(y), 0, y), elem_max).astype(F6[element]).astype(np.float32)
        out = np.ldexp(q, e).astype(np.float32)
    out = np.where((xb < 0), -out, out)
    out = np.where(np.isnan(xb), xb, out)
    return out.reshape(*x.shape[:-1], -1)[..., :n]


def _random(seed: int, shape=(1024, 1030)) -> np.ndarray:
    """Rows at scales from 1e-30 to 1e30, heavy tails, and a partial last block (1030 = 32 * 32 + 6)."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-30, 30, (shape[0], 1))
    x = (rng.standard_t(3.0, shape) * scale).astype(np.float32)
    x[::7, :64] = 0.0
    return x


def _edges(element: str) -> np.ndarray:
    """Blocks (rows of 32) at the E8M0 and element-table boundaries."""
    elem_max = mx_kernel.ELEMENTS[element][0]
    rows = []
    for k in (-140, -127, -126, -100, -1, 0, 1, 60, 120, 122):
        for amax in (elem_max * 2.0**k, np.nextafter(np.float32(elem_max * 2.0**k), np.float32(np.inf)),
                     np.nextafter(np.float32(elem_max * 2.0**k), np.float32(0))):
            row = np.linspace(-1, 1, 32, dtype=np.float32) * np.float32(amax)
            rows.append(row)
    values = mx_kernel.ELEMENTS[element][1] or tuple(range(128))
    mids = [(a + b) / 2 for a, b in zip(values[:-1], values[1:])]  # every tie, with the block amax = elem_max
    for i in range(0, len(mids), 31):
        chunk = mids[i:i + 31]
        rows.append(np.array(list(chunk) + [elem_max] * (32 - len(chunk)), np.float32))
    special = np.zeros(32, np.float32)
    special[:8] = [np.inf, -np.inf, np.nan, -0.0, 1e-45, -1e-40, F32_MAX, -F32_MAX]
    rows.append(special)
    rows.append(np.full(32, np.float32(1e-40)))  # an all-subnormal block
    rows.append(np.zeros(32, np.float32))
    return np.stack(rows)


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("element", ["int8", "e3m2", "e2m3"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=str)
def test_fake_quant_equals_reference_on_1m_elements(element, dtype):
    x = _random(hash((element, str(dtype))) % 2**31).astype(dtype)
    got = np.asarray(mx_kernel.fake_quant(jnp.asarray(x), element))
    want = reference(x.astype(np.float32), element).astype(dtype)
    assert got.dtype == dtype and x.size > 1_000_000
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("element", ["int8", "e3m2", "e2m3"])
@pytest.mark.parametrize("block", [8, 16, 32])
def test_edge_cases_and_block_sizes(element, block):
    x = _edges(element)
    got = np.asarray(mx_kernel.fake_quant(jnp.asarray(x), element, block))
    want = reference(x, element, block)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    # the special row: +-inf and +-FLT_MAX saturate to the largest element times 2^e, NaN stays, zeros are +0
    assert np.isnan(got[-3, 2]) and _bits(got[-3, 3]) == 0


def test_elements_and_exponents_by_hand():
    """Hand-computed vectors: a block of amax 28 is unscaled for E3M2 (2^0), 29 needs 2^1; INT8's block of amax
    127 keeps integers and rounds 2.5 to 2 (ties to even); E2M3's tie 7.25 goes to 7 (even), E3M2's 26 to 24."""
    x = np.zeros((4, 32), np.float32)
    x[0, :3] = [28.0, 27.0, 26.0]  # E3M2 table: 27 -> 28, 26 (tie between 24 and 28) -> 24
    x[1, :2] = [29.0, 1.0]  # amax 29: e = 1: 29 / 2 = 14.5 -> 14 -> 28, and 1.0 / 2 = 0.5 -> 1.0
    x[2, :3] = [127.0, 2.5, -3.5]
    x[3, :2] = [7.5, 7.25]
    e3m2 = np.asarray(mx_kernel.fake_quant(jnp.asarray(x[:2]), "e3m2"))
    assert list(e3m2[0, :3]) == [28.0, 28.0, 24.0] and list(e3m2[1, :2]) == [28.0, 1.0]
    int8 = np.asarray(mx_kernel.fake_quant(jnp.asarray(x[2:3]), "int8"))
    assert list(int8[0, :3]) == [127.0, 2.0, -4.0]
    e2m3 = np.asarray(mx_kernel.fake_quant(jnp.asarray(x[3:4]), "e2m3"))
    assert list(e2m3[0, :2]) == [7.5, 7.0]
    assert [int(v) for v in mx_kernel.nv_exponent(jnp.asarray([28.0, 29.0, 14.0, 0.0]), 28.0)] == [0, 1, -1, 0]


def test_presets_fake_quantize_and_refuse_export(tmp_path):
    """``--qformat mxint8`` / ``mxfp6`` resolve (their weights and inputs use the MX kernel numerics); the export
    is refused naming that nvidia-modelopt exports no checkpoint for them."""
    pytest.importorskip("torch")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    import _export_modelopt_ref as R

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.errors import UnsupportedError
    from jaxquant.export import export_hf
    from jaxquant.recipe import preset_recipe

    R.make_llama(tmp_path / "src", tie=False)
    for qformat, fmt in (("mxint8", "mxint8"), ("mxfp6", "mxfp6_e3m2")):
        loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
        quantize(loaded.model, preset_recipe(qformat, "none"), None, progress=False)
        lin = loaded.model.model.layers[0].mlp.down_proj
        assert lin.weight_quantizer.config.format == fmt and lin.input_quantizer.config.format == fmt
        w = np.asarray(lin.weight[...], np.float32)
        np.testing.assert_array_equal(np.asarray(lin.weight_quantizer(lin.weight[...])),
                                      reference(w, {"mxint8": "int8", "mxfp6_e3m2": "e3m2"}[fmt]))
        with pytest.raises(UnsupportedError, match="nvidia-modelopt 0.47 writes no checkpoint format"):
            export_hf(loaded, tmp_path / qformat)
