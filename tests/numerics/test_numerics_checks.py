"""host_all_finite: the loader's host-side NaN/Inf check, against numpy's own isfinite on the float values."""

import ml_dtypes
import numpy as np
import pytest

from jaxquant.numerics.checks import host_all_finite

DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_agrees_with_isfinite_on_every_bit_pattern_class(dtype):
    rng = np.random.default_rng(0)
    info = ml_dtypes.finfo(dtype) if dtype is ml_dtypes.bfloat16 else np.finfo(dtype)
    edge = np.array([0.0, -0.0, float(info.max), -float(info.max), float(info.smallest_subnormal),
                     -float(info.smallest_normal)], dtype)
    assert host_all_finite(edge)
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 5, 2999, 3007):
            a = rng.standard_normal(3008).astype(dtype)
            a[where] = bad
            assert host_all_finite(a) == bool(np.isfinite(a.astype(np.float64)).all()) is False
    # every 16-bit pattern of the 2-byte types: the bit rule is exactly isfinite
    if np.dtype(dtype).itemsize == 2:
        allbits = np.arange(1 << 16, dtype=np.uint16).view(dtype)
        finite = np.isfinite(allbits.astype(np.float32))
        assert not host_all_finite(allbits)
        assert host_all_finite(allbits[finite])
        assert all(not host_all_finite(allbits[i:i + 1]) for i in np.flatnonzero(~finite))
    # the extreme NaN payloads of either sign, next to the largest finite values of either sign
    n = np.dtype(dtype).itemsize * 8
    uint = np.dtype(f"u{np.dtype(dtype).itemsize}")
    exp_ones = int(np.array(np.inf, dtype).view(uint))
    for bits in (exp_ones | 1, (1 << (n - 1)) - 1, (1 << n) - 1, (1 << (n - 1)) | exp_ones | 1):
        a = np.concatenate([edge, np.array([bits], uint).view(dtype)])
        assert not np.isfinite(a.astype(np.float64)).all() and not host_all_finite(a)


def test_other_dtypes_pass():
    assert host_all_finite(np.arange(10, dtype=np.int32))
    assert host_all_finite(np.zeros(0, np.float32))
