"""Test oracle: the tensors a ModelOpt unified checkpoint stores per quantized linear, in numpy.

(This was ``jaxquant/export/tensors.py``; the exporter now computes these tensors with the jitted
JAX numerics through ``jaxquant.formats``, and this independent numpy re-implementation is kept
only to check them: tests/formats/test_registry.py, tests/export/test_export_tensors.py.)

These are ModelOpt 0.47's *export* formulas (``export/quant_utils.py::to_quantized_weight``,
``qtensor/nvfp4_tensor.py``; spec modelopt.md §2.5, §5.2), reproduced operation by operation in
numpy float32 so that every byte matches what ``export_hf_checkpoint`` writes for the same weight
and amax (tested against nvidia-modelopt on CPU). They run in numpy on purpose: IEEE float32
division on the host gives the same bytes whatever accelerator the model lives on (TPU division is
not correctly rounded).

=====================  ===============================  =============================================
format                 tensors                          formula
=====================  ===============================  =============================================
FP8 (per tensor)       ``weight`` F8_E4M3 [out, in]     ``e4m3(dtype(w / weight_scale))``, no clamp
                       ``weight_scale`` F32 []          ``amax / 448``
FP8 per channel        ``weight`` F8_E4M3, ``weight_scale`` F32 [out] = ``amax[out] / 448``
NVFP4 (W4A4, W4A16)    ``weight`` U8 [out, in/2]        E2M1 codes of ``w / (weight_scale * weight_scale_2)``,
                                                        even element in the low nibble
                       ``weight_scale`` F8_E4M3         ``e4m3(clamp(block_amax / (6 * weight_scale_2), 2^-9, 448))``,
                       [out, in/16]                     a zero block -> 1.0
                       ``weight_scale_2`` F32 []        ``amax / 2688``
activations            ``input_scale`` F32 []           FP8 ``amax / 448``; NVFP4 ``amax / 2688``
KV cache               ``k_scale`` / ``v_scale`` F32 [] ``amax / 448`` (FP8 and NVFP4 KV alike)
=====================  ===============================  =============================================

``dtype`` in the FP8 row: ModelOpt divides in the export dtype (``weight.to(dtype) / scale``), so a
bfloat16 model's quotient is rounded to bfloat16 before the cast to E4M3 (double rounding; a
float32 model rounds once). ``fp8_weight(..., compute_dtype=)`` reproduces both.

Zero and non-finite amax (a documented deviation where ModelOpt writes NaN or fails):

* NaN / Inf in a weight or amax raises ``NonFiniteError`` naming the tensor.
* A zero amax (an all-zero weight; an activation, expert or KV quantizer calibration never
  reached) is replaced by the format's maxbound — 448 for FP8, 6 for NVFP4 — which is what
  ModelOpt's ``TensorQuantizer.export_amax`` does for activations, and what
  ``jaxquant.numerics.fp8/nvfp4.quantize`` do: ``weight_scale`` / ``input_scale`` / ``k_scale``
  = 1.0 (FP8), ``weight_scale_2`` = ``input_scale`` = 6/2688 (NVFP4), zero codes. Scales are never
  0 or NaN (ModelOpt's weight export would write ``weight_scale = 0`` and NaN weights for an
  all-zero FP8 weight, NaN block scales for an all-zero NVFP4 weight; spec §2.5).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxquant.errors import ExportError, NonFiniteError

E4M3_MAX = np.float32(448.0)
E2M1_MAX = np.float32(6.0)
NVFP4_GLOBAL = np.float32(6.0 * 448.0)  # 2688
SCALE_MIN = np.float32(2.0**-9)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
_E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _f32(x) -> np.ndarray:
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype != np.float32 else a


def check_finite(x, what: str) -> None:
    """Raise NonFiniteError naming ``what`` if ``x`` holds NaN or Inf."""
    a = np.asarray(x)
    if a.dtype.kind == "f" or a.dtype in (BF16, F8):
        bad = ~np.isfinite(a.astype(np.float32) if a.dtype in (BF16, F8) else a)
        n = int(bad.sum())
        if n:
            raise NonFiniteError(
                f"{what}: {n} of {a.size} values are NaN or Inf; a quantized checkpoint cannot be exported. "
                "Check the source weights / calibration data of this layer."
            )


def safe_amax(amax, replacement: float, what: str) -> np.ndarray:
    """float32 amax with zeros replaced by ``replacement`` (checked finite and >= 0)."""
    a = _f32(amax)
    check_finite(a, what)
    if np.any(a < 0):
        raise ExportError(f"{what}: negative amax {a.min()}; amax must be max|x| >= 0.")
    return np.where(a == 0, np.float32(replacement), a).astype(np.float32)


# ----------------------------------------------------------------------------------------------- FP8
def fp8_weight(w, amax, *, compute_dtype=None, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """FP8 per-tensor (0-d amax) or per-channel (``[out]`` / ``[out, 1]`` amax) export.

    Args:
      w: ``[..., out, in]`` weight (any float dtype; 3-D for stacked experts with ``[E]`` amax).
      amax: per-tensor (scalar, or ``[E]`` with 3-D ``w``) or per-channel amax.
      compute_dtype: dtype in which ``w / scale`` is rounded before the E4M3 cast (ModelOpt: the
        export dtype); defaults to ``w``'s dtype.

    Returns:
      ``(weight float8_e4m3fn, weight_scale float32)`` with ``weight_scale = amax / 448``.
    """
    check_finite(w, what)
    w_np = np.asarray(w)
    compute_dtype = np.dtype(compute_dtype) if compute_dtype is not None else w_np.dtype
    scale = safe_amax(amax, 448.0, what + " amax") / E4M3_MAX
    s = scale
    if s.ndim == 1 and w_np.ndim == 3 and s.shape[0] == w_np.shape[0]:  # stacked experts, per-tensor
        s = s[:, None, None]
    elif s.ndim == 1:  # per channel
        s = s[:, None]
    if w_np.dtype != compute_dtype:  # ModelOpt: weight.to(dtype) / scale
        w_np = w_np.astype(compute_dtype)
    q = _f32(w_np) / s
    if compute_dtype != np.float32 and s.ndim == 0:
        # torch keeps ``bf16_tensor / f32_0d_tensor`` in bfloat16; a dimensioned (per-channel or
        # per-expert) float32 scale promotes the quotient to float32 (checked against ModelOpt's
        # to_quantized_weight(..., "fp8_pc_pt") in tests/formats/test_registry.py)
        q = q.astype(compute_dtype)
    return q.astype(F8), scale


def fp8_dequantize(q, scale, dtype=np.float32) -> np.ndarray:
    """``q * scale`` (ModelOpt ``from_quantized_weight``; per-channel scale broadcast over rows)."""
    s = _f32(scale)
    if s.ndim == 1:
        s = s[:, None]
    return (np.asarray(q).astype(np.float32) * s).astype(dtype)


# ----------------------------------------------------------------------------------------------- FP8 2-D blocks
def fp8_block_weight(w, amax, *, compute_dtype=None, what: str = "weight", block=(128, 128)):
    """FP8_PB_WO export: ``weight_scale [Mb, 1, Nb, 1] = amax / 448`` (0 -> 1.0); each element divided in float32
    by its block's scale (blocks of ``block``, the last ones cut short) and cast to E4M3 (ModelOpt
    ``FP8QTensor.quantize`` with a 2-D block scale)."""
    check_finite(w, what)
    w_np = np.asarray(w)
    compute_dtype = np.dtype(compute_dtype) if compute_dtype is not None else w_np.dtype
    scale = safe_amax(amax, 448.0, what + " amax") / E4M3_MAX
    s2 = scale[:, 0, :, 0]
    full = np.repeat(np.repeat(s2, block[0], axis=0), block[1], axis=1)[: w_np.shape[0], : w_np.shape[1]]
    q = (_f32(w_np.astype(compute_dtype)) / full).astype(ml_dtypes.float8_e4m3fn)
    return q, scale.astype(np.float32)


# ----------------------------------------------------------------------------------------------- INT8
def int8_weight(w, amax, *, compute_dtype=None, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """INT8 per-channel (W8A16) export: ``weight_scale = amax / 127`` (0 -> 1.0), ``q = clip(rint(w / s), -128, 127)``
    with ``w`` in ``compute_dtype`` divided in float32 (ModelOpt ``to_quantized_weight``'s INT8 branch)."""
    check_finite(w, what)
    w_np = np.asarray(w)
    compute_dtype = np.dtype(compute_dtype) if compute_dtype is not None else w_np.dtype
    scale = (safe_amax(amax, 127.0, what + " amax").reshape(-1) / np.float32(127.0)).astype(np.float32)
    q = np.rint(_f32(w_np.astype(compute_dtype)) / scale[:, None])
    return np.clip(q, -128, 127).astype(np.int8), scale


# ----------------------------------------------------------------------------------------------- INT4
def int4_weight(w, amax, *, compute_dtype=None, what: str = "weight", block: int = 128):
    """INT4 block (W4A16_AWQ) export: ``weight_scale = amax / 7`` per ``[out, in/block]`` block (0 -> 1.0), codes
    ``clip(rint(w / s), -8, 7)`` with ``w`` in ``compute_dtype`` divided in float32, then two output rows per byte
    (row 2k low nibble; ModelOpt ``pack_int4_in_uint8``): ``(uint8 [out/2, in], float32 [out, in/block])``."""
    check_finite(w, what)
    w_np = np.asarray(w)
    compute_dtype = np.dtype(compute_dtype) if compute_dtype is not None else w_np.dtype
    out, n = w_np.shape
    scale = (safe_amax(amax, 7.0, what + " amax").reshape(out, n // block) / np.float32(7.0)).astype(np.float32)
    full = np.repeat(scale, block, axis=1)
    codes = np.clip(np.rint(_f32(w_np.astype(compute_dtype)) / full), -8, 7).astype(np.int8)
    nib = codes.view(np.uint8) & 0x0F
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8), scale


def int4_dequantize(packed, scale, block: int = 128) -> np.ndarray:
    """``code * scale`` in float32 from ``int4_weight``'s tensors."""
    packed = np.asarray(packed)
    codes = np.empty((packed.shape[0] * 2, packed.shape[1]), np.int16)
    codes[0::2], codes[1::2] = packed & 0x0F, packed >> 4
    codes = np.where(codes > 7, codes - 16, codes).astype(np.float32)
    return codes * np.repeat(np.asarray(scale, np.float32), block, axis=1)


def fp8_fake_quant(x, amax) -> np.ndarray:
    """FP8 E4M3 quantize-dequantize of float32 ``x`` with a per-tensor ``amax`` as ModelOpt computes it:
    ``scale = (1 / amax) * 448``, ``e4m3(clip(x * scale, +-448)) * (1 / scale)`` (amax <= 2^-24 -> 1.0)."""
    a = np.float32(amax)
    a = np.float32(1.0) if a <= np.float32(2.0**-24) else a
    scale = np.float32(np.float32(np.float32(1.0) / a) * np.float32(448.0))
    q = np.clip(_f32(x) * scale, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return (q * np.float32(np.float32(1.0) / scale)).astype(np.float32)


def w4a8_dequantize(packed, scale, scale_2, block: int = 128) -> np.ndarray:
    """W4A8_AWQ: ``fp8_fake_quant(code * scale, 448 * scale_2)`` (the INT4 values, then the FP8 step)."""
    amax = np.float32(np.float32(np.asarray(scale_2, np.float32).reshape(())) * np.float32(448.0))
    return fp8_fake_quant(int4_dequantize(packed, scale, block), amax)


# ----------------------------------------------------------------------------------------------- NVFP4
def e2m1_codes(x: np.ndarray) -> np.ndarray:
    """4-bit E2M1 codes (uint8, sign in bit 3) of float32 ``x``, ModelOpt ``_cast_fp4``:
    round to nearest, ties to the even code; saturates at 6; tiny negatives -> 8 (-0)."""
    sign = (x < 0).astype(np.uint8)
    a = np.abs(x)
    order = np.searchsorted(_E2M1_BOUNDS, a, side="left").astype(np.uint8)
    tie_up = ((a == np.float32(0.75)) | (a == np.float32(1.75)) | (a == np.float32(3.5))).astype(np.uint8)
    return (sign << 3) + order + tie_up


def pack_e2m1(codes: np.ndarray) -> np.ndarray:
    """Two codes per byte along the last axis: element 2j in the low nibble, 2j+1 in the high."""
    return ((codes[..., 1::2] << 4) | codes[..., 0::2]).astype(np.uint8)


def unpack_e2m1(packed: np.ndarray) -> np.ndarray:
    p = np.asarray(packed, np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def _block_amax(w32: np.ndarray, block: int) -> np.ndarray:
    return np.max(np.abs(w32.reshape(*w32.shape[:-1], -1, block)), axis=-1)


def nvfp4_weight(
    w,
    amax,
    *,
    block_size: int = 16,
    block_amax=None,
    compute_dtype=None,
    what: str = "weight",
    global_divisor=NVFP4_GLOBAL,
    fp8_norm=E4M3_MAX,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NVFP4 export of ``w [..., out, in]`` (``global_divisor`` 448 for W4A8_NVFP4_FP8; 1536 with ``fp8_norm`` 256
    for Four-over-Six static blocks).

    Args:
      amax: per-tensor amax (the global amax; ``[E]`` for stacked experts ``[E, out, in]``).
      block_size: 16 for NVFP4.
      block_amax: per-block amax ``[..., out, in/16]`` of a static-block quantizer
        (``nvfp4_static``); None for the default dynamic blocks (computed from ``w``).
      compute_dtype: ModelOpt packs ``weight.to(dtype)`` (the export dtype) while the block scales
        come from the weight as it is; pass the export dtype to reproduce that (default: ``w``'s).

    Returns:
      ``(packed uint8 [..., out, in/2], weight_scale float8_e4m3fn [..., out, in/16],
      weight_scale_2 float32 [] or [E])``.
    """
    check_finite(w, what)
    w32 = _f32(w)
    if w32.shape[-1] % block_size:
        raise ExportError(
            f"{what}: input dimension {w32.shape[-1]} is not a multiple of the NVFP4 block size {block_size}; "
            "exclude this layer from NVFP4 in the recipe."
        )
    gamax = safe_amax(amax, 6.0, what + " amax")
    wsf2 = gamax / np.float32(global_divisor)
    # stacked experts: [E] -> [E, 1, 1] against the [E, out, in/16] block scales
    wsf2_b = wsf2.reshape((-1,) + (1,) * (w32.ndim - 1)) if wsf2.ndim else wsf2
    if block_amax is None:
        pba = _block_amax(w32, block_size)
        per_block = pba / (E2M1_MAX * wsf2_b)
        per_block = np.where(per_block == 0, np.float32(1.0), per_block).astype(np.float32)
    else:
        pba = _f32(block_amax).reshape(*w32.shape[:-1], -1)
        check_finite(pba, what + " block amax")
        per_block = pba / E2M1_MAX
        per_block = np.where(per_block == 0, np.float32(1.0), per_block).astype(np.float32)
        per_block_max = gamax / E2M1_MAX
        if per_block_max.ndim:
            per_block_max = per_block_max.reshape((-1,) + (1,) * (w32.ndim - 1))
        per_block = (per_block * np.float32(fp8_norm)) / per_block_max
    scale = np.clip(per_block, SCALE_MIN, E4M3_MAX).astype(F8)
    denom = scale.astype(np.float32) * wsf2_b
    w_np = np.asarray(w)
    if compute_dtype is not None and np.dtype(compute_dtype) != w_np.dtype:
        w32 = _f32(w_np.astype(compute_dtype))
    scaled = w32.reshape(*w32.shape[:-1], -1, block_size) / denom[..., None]
    codes = e2m1_codes(scaled.reshape(w32.shape))
    return pack_e2m1(codes), scale, wsf2


def nvfp4_dequantize(packed, weight_scale, weight_scale_2, dtype=np.float32, block_size: int = 16) -> np.ndarray:
    """``e2m1 * (weight_scale * weight_scale_2)`` per block (ModelOpt ``NVFP4QTensor.dequantize``)."""
    vals = E2M1_VALUES[unpack_e2m1(packed)]
    s = np.asarray(weight_scale).astype(np.float32)
    s2 = _f32(weight_scale_2)
    if s2.ndim:
        s2 = s2.reshape((-1,) + (1,) * (s.ndim - 1))
    per_block = s * s2
    out = vals.reshape(*vals.shape[:-1], -1, block_size) * per_block[..., None]
    return out.reshape(vals.shape).astype(dtype)


def mxfp8_weight(w, *, compute_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """MXFP8 export of ``w [..., out, in]`` (ModelOpt ``MXFP8QTensor``): E8M0 bytes ``e + 127`` per 32 inputs,
    ``e = clip(ceil(log2_f32(block amax / 448)), -127, 127)`` (-127 for a zero block), codes
    ``e4m3(clip(w * 2^-e, -448, 448))`` of ``w`` cast to ``compute_dtype``."""
    w32 = _f32(w)
    blocks = w32.reshape(*w32.shape[:-1], -1, 32)
    d = (np.abs(blocks).max(-1) / E4M3_MAX).astype(np.float32)
    with np.errstate(divide="ignore"):
        e = np.where(d > 0, np.ceil(np.log2(d)), np.float32(-127.0))
    e = np.clip(e, -127, 127).astype(np.int32)
    src = _f32(np.asarray(w).astype(compute_dtype)) if compute_dtype is not None else w32
    scaled = np.ldexp(src.reshape(blocks.shape), -e[..., None]).astype(np.float32)
    q = np.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(F8).reshape(w32.shape)
    return q, (e + 127).astype(np.uint8)


def mxfp4_weight(w, *, compute_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 export (ModelOpt ``MXFP4QTensor.quantize``): ``e = ceil(max(log2_f32(block amax / 6), -127))``, codes
    counting the E2M1 bounds strictly below ``|x * 2^-e|`` (ties toward zero), sign bit for negatives and zeros,
    the even element of each pair in the low nibble."""
    w32 = _f32(w)
    blocks = w32.reshape(*w32.shape[:-1], -1, 32)
    d = (np.abs(blocks).max(-1) / E2M1_MAX).astype(np.float32)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.maximum(np.log2(d), np.float32(-127.0))).astype(np.int32)
    src = _f32(np.asarray(w).astype(compute_dtype)) if compute_dtype is not None else w32
    y = np.ldexp(src.reshape(blocks.shape), -e[..., None]).astype(np.float32).reshape(w32.shape)
    order = (np.abs(y)[..., None] > _E2M1_BOUNDS).sum(-1)
    codes = (np.where((y < 0) | (y == 0), 8, 0) + order).astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), (e + 127).astype(np.uint8)


def mxfp8_dequantize(q, scale, dtype=np.float32) -> np.ndarray:
    """``q * 2^(scale - 127)`` per block of 32 inputs."""
    qf = np.asarray(q).astype(np.float32)
    blocks = qf.reshape(*qf.shape[:-1], -1, 32)
    out = np.ldexp(blocks, np.asarray(scale).astype(np.int32)[..., None] - 127).astype(np.float32)
    return out.reshape(qf.shape).astype(dtype)


# ----------------------------------------------------------------------------------------------- activations / KV
def fp8_input_scale(amax, what: str = "input amax") -> np.ndarray:
    return (safe_amax(amax, 448.0, what) / E4M3_MAX).astype(np.float32)


def nvfp4_input_scale(amax, what: str = "input amax") -> np.ndarray:
    return (safe_amax(amax, 6.0, what) / NVFP4_GLOBAL).astype(np.float32)


def kv_scale(amax, what: str = "kv amax") -> np.ndarray:
    """``k_scale`` / ``v_scale`` = amax / 448 for FP8 and NVFP4 KV caches."""
    return (safe_amax(amax, 448.0, what) / E4M3_MAX).astype(np.float32)
