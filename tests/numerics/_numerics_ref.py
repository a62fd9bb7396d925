"""Oracles and helpers for the numerics tests.

Two kinds of reference, both independent of jaxquant's code:
* ModelOpt's own CPU functions (torch): ``fp8_eager`` / ``scaled_e4m3_impl``, the export
  ``to_quantized_weight``, ``NVFP4QTensor`` (quantize, scale factors, dequantize).
* A float32 numpy emulation of the two Triton kernels, which have no CPU path in ModelOpt:
  ``fp4_fake_quant_block`` (dynamic) and ``static_blockwise_fp4_fake_quant`` (whose block scale is
  computed with ModelOpt's own ``scaled_e4m3_impl`` on CPU, as ``compute_fp4_scales`` does).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from modelopt.torch.export.quant_utils import get_scaling_factor, to_quantized_weight
    from modelopt.torch.quantization import tensor_quant as mo_tq
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

F32 = np.float32
DTYPES = ("float32", "bfloat16", "float16")
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JNP = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


# ----------------------------------------------------------------------------- comparisons
def bits(a) -> np.ndarray:
    """The raw bits of an array (numpy, jax or torch) as unsigned ints."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.view(torch.int16)
        elif a.dtype == torch.float8_e4m3fn:
            a = a.view(torch.uint8)
        a = a.numpy()
    a = np.asarray(a)
    return a.view(_UINT[a.dtype.itemsize]) if a.dtype.kind != "u" else a


def assert_bits_equal(ours, ref, what: str = ""):
    """Bitwise equality (same shape, same bits), with the first differences in the message."""
    b1, b2 = bits(ours), bits(ref)
    assert b1.shape == b2.shape, f"{what}: shape {b1.shape} != {b2.shape}"
    assert b1.dtype.itemsize == b2.dtype.itemsize, f"{what}: itemsize {b1.dtype} != {b2.dtype}"
    bad = np.flatnonzero(b1.ravel() != b2.ravel())
    if bad.size:
        o = np.asarray(ours if not isinstance(ours, torch.Tensor) else ours.float().numpy()).ravel()
        r = np.asarray(ref if not isinstance(ref, torch.Tensor) else ref.float().numpy()).ravel()
        first = ", ".join(f"[{i}] {o[i]!r} vs {r[i]!r}" for i in bad[:5])
        raise AssertionError(f"{what}: {bad.size} of {b1.size} differ; first: {first}")


def to_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    """float32 numpy -> torch tensor of ``dtype`` (values must already be representable)."""
    return torch.from_numpy(np.ascontiguousarray(x, F32)).to(TORCH[dtype])


def to_jax(x: np.ndarray, dtype: str):
    return jnp.asarray(np.ascontiguousarray(x, F32)).astype(JNP[dtype])


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (RNE) to ``dtype`` and back to float32."""
    return np.asarray(x, F32).astype(NP[dtype]).astype(F32)


# ----------------------------------------------------------------------------- data
def mixed_data(rng: np.random.Generator, shape, dtype: str = "float32", block: int = 16) -> np.ndarray:
    """Hard data for block formats, as float32 values exactly representable in ``dtype``.

    Rows span 1e-4..1e3; inside a row each block gets its own extra factor 1e-6..1, so tiny blocks sit
    next to large ones (some tiny enough to hit the export clamp and the 1e-5 fake-quant floor);
    ~1% of blocks are zero, a few elements are -0.0.
    """
    *lead, k = shape
    x = rng.standard_normal(shape).astype(F32)
    x *= 10.0 ** rng.uniform(-4, 3, size=(*lead, 1)).astype(F32)
    nb = -(-k // block)
    f = 10.0 ** rng.uniform(-6, 0, size=(*lead, nb)).astype(F32)
    f[rng.random(f.shape) < 0.01] = 0.0
    x *= np.repeat(f, block, axis=-1)[..., :k]
    x[rng.random(shape) < 0.001] = -0.0
    return round_to(x, dtype)


# ----------------------------------------------------------------------------- FP8 (ModelOpt)
def mo_fp8_fake_quant(x: torch.Tensor, amax) -> torch.Tensor:
    """ModelOpt's CPU path: ``scaled_e4m3_impl`` (dispatches to ``fp8_eager`` on CPU)."""
    return mo_tq.scaled_e4m3_impl(x, torch.as_tensor(amax, dtype=torch.float32))


def mo_fp8_export(w: torch.Tensor, amax: torch.Tensor, axis=None):
    """ModelOpt export of an FP8 weight: TensorQuantizer -> get_scaling_factor -> to_quantized_weight.

    As in ``unified_export_hf._export_quantized_weight``, a per-tensor ``weight_scale`` reaches
    ``to_quantized_weight`` as a 0-d tensor (so a bf16 weight is divided in bf16);
    ``test_fp8_export_through_modelopt_module`` pins that against the real module export.
    """
    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=axis))
    q.amax = amax
    scale = get_scaling_factor(q)
    if axis is None:
        scale = scale.reshape(())
    return to_quantized_weight(w, scale, "fp8" if axis is None else "fp8_pc_pt"), scale


# ----------------------------------------------------------------------------- E2M1 (emulation)
def e2m1_round_magnitude_np(a: np.ndarray) -> np.ndarray:
    """Triton ``fp4_round_magnitude`` in numpy."""
    conds = [a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0]
    return np.select(conds, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], 6.0).astype(F32)


def _blocks_np(x: np.ndarray, bs: int) -> np.ndarray:
    pad = -x.shape[-1] % bs
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), F32)], axis=-1)
    return x.reshape(*x.shape[:-1], -1, bs)


def triton_dynamic_np(x: np.ndarray, global_amax, bs: int = 16) -> np.ndarray:
    """float32 emulation of ``fp4_fake_quant_block`` (returns float32; cast to the input dtype after).

    ``global_amax`` is a scalar or broadcastable to ``x.shape[:-1] + (1,)``.
    """
    k = x.shape[-1]
    gs = np.asarray(global_amax, F32) / F32(6.0 * 448.0)
    gs = np.where(gs > 0, gs, F32(1e-12)).astype(F32)[..., None]
    xb = _blocks_np(np.asarray(x, F32), bs)
    bmax = np.abs(xb).max(axis=-1, keepdims=True)
    s = np.minimum(bmax / (F32(6.0) * gs), F32(448.0)).astype(F32)
    s = s.astype(ml_dtypes.float8_e4m3fn).astype(F32) * gs
    s = np.where(s >= F32(1e-5), s, F32(1.0)).astype(F32)
    y = e2m1_round_magnitude_np(np.abs(xb) / s) * s
    y = np.where(xb >= 0, y, F32(0) - y).astype(F32)  # Triton's -y is 0 - y (+0.0 for y = 0)
    return y.reshape(*y.shape[:-2], -1)[..., :k]


def static_scale_mo(block_amax: np.ndarray, global_amax, fp8_max: float = 448.0) -> np.ndarray:
    """``compute_fp4_scales`` (ModelOpt gemm/fp4_kernel.py, which imports triton: its torch lines here) with ModelOpt's
    own CPU ``scaled_e4m3_impl``; ``fp8_max`` 256: Four-over-Six."""
    amax = torch.from_numpy(np.asarray(block_amax, F32)).float()
    scale = amax / 6.0
    global_amax = torch.as_tensor(np.asarray(global_amax, F32)).float()
    scale_fp8_quant_amax = global_amax * (448.0 / fp8_max) / 6.0
    return mo_tq.scaled_e4m3_impl(scale, scale_fp8_quant_amax).numpy()


def triton_static_np(x: np.ndarray, block_amax: np.ndarray, global_amax, bs: int = 16,
                     fp8_max: float = 448.0) -> np.ndarray:
    """Static kernel: ModelOpt's block scale, then ``nvfp4_scalar_quant`` emulated in numpy."""
    k = x.shape[-1]
    scale = static_scale_mo(block_amax, global_amax, fp8_max)[..., None]
    zero = scale == 0
    safe = np.where(zero | ~np.isfinite(scale), F32(1.0), scale).astype(F32)
    xb = _blocks_np(np.asarray(x, F32), bs)
    y = e2m1_round_magnitude_np(np.abs(xb) / safe) * safe
    y = np.where(xb >= 0, y, F32(0) - y)
    y = np.where(zero, F32(0.0), y).astype(F32)
    return y.reshape(*y.shape[:-2], -1)[..., :k]


# ----------------------------------------------------------------------------- NVFP4 (ModelOpt)
def mo_nvfp4_export(w: torch.Tensor, global_amax=None, block_amax=None, bs: int = 16):
    """ModelOpt NVFP4 export: ``(packed uint8, weight_scale e4m3, weight_scale_2 f32)``.

    Dynamic: ``get_weights_scaling_factor(_2)`` from the weight (or a quantizer amax);
    static: ``get_weights_scaling_factor_from_quantizer`` with a quantizer holding ``_amax`` (per
    block) and ``global_amax``. Then ``NVFP4QTensor.quantize`` with those scales.
    """
    if block_amax is not None:
        quantizer = SimpleNamespace(
            block_sizes={-1: bs},
            _amax=torch.from_numpy(np.asarray(block_amax, F32)),
            global_amax=torch.as_tensor(np.asarray(global_amax, F32)),
        )
        wsf, wsf2 = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(quantizer, w)
    elif global_amax is not None:
        quantizer = SimpleNamespace(block_sizes={-1: bs}, _amax=torch.as_tensor(np.asarray(global_amax, F32)))
        wsf2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
        wsf, _ = NVFP4QTensor.get_weights_scaling_factor(w, bs, wsf2)
    else:
        qt, wsf, wsf2 = NVFP4QTensor.quantize(w, bs)
        return qt, wsf, wsf2
    qt, _, _ = NVFP4QTensor.quantize(w, bs, wsf, wsf2)
    return qt, wsf, wsf2


def mo_nvfp4_dequant(qt, wsf, wsf2, dtype: str, bs: int = 16) -> torch.Tensor:
    return qt.dequantize(dtype=TORCH[dtype], scale=wsf, double_scale=wsf2, block_sizes={-1: bs})
