"""On a CUDA machine: our kernels (JAX on the GPU) against ModelOpt's real GPU kernels, bitwise.

Skipped where there is no CUDA GPU (CI). On a GPU machine it needs torch with CUDA, triton and
nvidia-modelopt; run the whole ``tests/numerics`` folder there, which then checks the JAX GPU
backend against the CPU oracles. No XLA flag is needed: XLA's approximate GPU division
(``div.full``) is rounded exactly by ``jaxquant.numerics._exact.div``.

* ``fp4_fake_quant_block`` (Triton, dynamic NVFP4) with the global amax on the CPU, so that the
  kernel's ``global_amax / 2688`` is an IEEE division as in our port (see docs/numerics.md);
* the static kernel ``static_blockwise_fp4_fake_quant_kernel`` fed our block scales (the scale
  computation itself is compared with ModelOpt's CPU code in test_numerics_nvfp4.py);
* the FP8 CUDA extension ``fake_e4m3fy`` when it builds.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")
try:
    GPU = jax.devices("gpu")[0]
except RuntimeError:
    pytest.skip("JAX has no GPU backend here", allow_module_level=True)

from _numerics_ref import DTYPES, F32, TORCH, assert_bits_equal, mixed_data  # noqa: E402

from jaxquant.numerics import fp8, nvfp4  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel import (  # noqa: E402
        _torch_dtype_to_tl,
        static_blockwise_fp4_fake_quant_kernel,
    )
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import fp4_fake_quant_block  # noqa: E402


def _cuda(x: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, F32)).to(TORCH[dtype]).cuda()


def _gpu(x: np.ndarray, dtype: str):
    return jax.device_put(jnp.asarray(x, jnp.float32).astype(dtype), GPU)


_TRITON_BF16 = pytest.mark.xfail(
    strict=True,
    reason="fp4_fake_quant_block with bfloat16 input differs from its float32 formula on 180 of 2M "
    "elements (block scales 2x apart); open, see docs/numerics.md",
)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=_TRITON_BF16), "float16"])
def test_triton_dynamic_kernel(dtype):
    rng = np.random.default_rng(40)
    x = mixed_data(rng, (2048, 1024), dtype)
    amax = F32(np.abs(x).max())
    for ga in [amax, amax * F32(0.01), amax * F32(7.0)]:
        ref = fp4_fake_quant_block(_cuda(x, dtype), torch.tensor(ga))  # CPU global amax
        ours = nvfp4.fake_quant_dynamic(_gpu(x, dtype), ga)
        assert_bits_equal(ours, ref.cpu(), f"Triton dynamic {dtype} ga={ga}")
    # What ModelOpt computes with the amax on the GPU (as in a real calibration): torch's CUDA
    # division by a Python float is a multiplication by its reciprocal. Report, don't assert.
    ref_gpu = fp4_fake_quant_block(_cuda(x, dtype), torch.tensor(amax).cuda())
    ours = np.asarray(nvfp4.fake_quant_dynamic(_gpu(x, dtype), amax))
    mism = int((torch.from_numpy(np.asarray(ours, np.float32)) != ref_gpu.float().cpu()).sum())
    gs_ieee = np.float32(amax) / np.float32(2688)
    gs_cuda = float((torch.tensor(amax).cuda() / (6.0 * 448.0)).cpu())
    print(f"\n[{dtype}] amax on GPU: gs ieee={gs_ieee!r} cuda={np.float32(gs_cuda)!r}; {mism} of {x.size} differ")


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_static_kernel(dtype):
    rng = np.random.default_rng(41)
    x = mixed_data(rng, (1024, 1024), dtype)
    bmax = np.abs(x.reshape(1024, 64, 16)).max(-1)
    bmax = (bmax * rng.uniform(0.4, 1.3, bmax.shape)).astype(F32)
    bmax[rng.random(bmax.shape) < 0.01] = 0
    ga = F32(bmax.max())
    scale = np.asarray(nvfp4.static_block_scale(bmax, ga))
    xt = _cuda(x, dtype).reshape(-1)
    y = torch.empty_like(xt)
    n = scale.size
    static_blockwise_fp4_fake_quant_kernel[(n,)](
        xt, y, torch.from_numpy(scale).cuda().reshape(-1), n, 16, OUT_DTYPE=_torch_dtype_to_tl(TORCH[dtype])
    )
    ours = nvfp4.fake_quant_static(_gpu(x, dtype), bmax, ga)
    assert_bits_equal(ours, y.reshape(x.shape).cpu(), f"Triton static {dtype}")


def _fp8_ext():
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

    ext = get_cuda_ext_fp8(raise_if_failed=False)
    if ext is None:
        pytest.skip("the FP8 CUDA extension did not build")
    return ext


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_cuda_extension(dtype):
    ext = _fp8_ext()
    rng = np.random.default_rng(42)
    x = mixed_data(rng, (1024, 1024), dtype)
    for amax in [np.abs(x).max(), *(10.0 ** rng.uniform(-4, 3, 5))]:
        amax = F32(amax)
        ref = ext.fake_e4m3fy(_cuda(x, dtype), torch.tensor(amax).cuda())
        assert_bits_equal(fp8.fake_quant(_gpu(x, dtype), amax), ref.cpu(), f"fp8 ext {dtype} amax={amax}")


@pytest.mark.xfail(strict=True, reason=(
    "ModelOpt's per-channel kernel fake_e4m3fy_with_axis differs from ModelOpt's own eager per-channel "
    "formula (which jaxquant follows, bit-exact on the CPU) by one ulp on ~17% of float32 elements (H100, "
    "ModelOpt 0.47); open, see docs/numerics.md"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_cuda_extension_per_channel(dtype):
    ext = _fp8_ext()
    x = mixed_data(np.random.default_rng(42), (1024, 1024), dtype)
    amax_rows = np.abs(x).max(axis=1)
    ref = ext.fake_e4m3fy_with_axis(_cuda(x, dtype), torch.from_numpy(amax_rows).cuda(), 0)
    assert_bits_equal(fp8.fake_quant(_gpu(x, dtype), amax_rows[:, None]), ref.cpu(), f"fp8 ext per-channel {dtype}")
