"""Every registered format: export_tensors (jitted JAX) equals the independent numpy oracle byte for
byte, its specs describe what it computes, dequantize inverts it, and unknown names are refused."""

import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
import _numpy_export_ref as T

from jaxquant import formats
from jaxquant.errors import ExportError, NonFiniteError, UnsupportedError
from jaxquant.formats.base import QuantFormat

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), BF16)


INT4 = "W4A16_AWQ"
W4A8 = "W4A8_AWQ"


def _shape(fmt, shape=(48, 96)):
    """A test weight shape ``fmt`` can export: INT4 wants whole blocks of 128 inputs."""
    return (shape[0], 256) if fmt.quant_algo in (INT4, W4A8) else shape


def _weight(seed, shape=(48, 96), dtype=np.float32, kind="normal"):
    rng = np.random.default_rng(seed)
    if kind == "zero":
        return np.zeros(shape, dtype)
    if kind == "tails":  # heavy tails: Student-t, outliers, tiny and all-zero blocks
        w = rng.standard_t(2.0, size=shape).astype(np.float32) * 0.02
        w[0, :16] = 0.0
        w[1, 16:32] *= 1e-5
        w[2, 7] = 3.0
        w[3, 40] = -5.0
    else:
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return w.astype(dtype)


def _bytes(a):
    a = np.asarray(a)
    return a.dtype, a.shape, a.tobytes()


def _oracle(fmt, w, w_amax, block_amax, in_amax, compute_dtype):
    if fmt.quant_algo == INT4:
        q, s = T.int4_weight(w, w_amax, compute_dtype=compute_dtype)
        return {"weight": q, "weight_scale": s}
    if fmt.quant_algo == W4A8:  # INT4 from the block amax, weight_scale_2 from the per-tensor FP8 amax
        q, s = T.int4_weight(w, block_amax, compute_dtype=compute_dtype)
        out = {"weight": q, "weight_scale": s, "weight_scale_2": T.fp8_input_scale(w_amax).reshape(())}
        if in_amax is not None:
            out["input_scale"] = T.fp8_input_scale(in_amax).reshape(())
        return out
    if fmt.quant_algo == "MXFP8":
        q, s = T.mxfp8_weight(w, compute_dtype=compute_dtype)
        return {"weight": q, "weight_scale": s}
    if fmt.quant_algo in ("mxfp4", "W4A8_MXFP4_FP8"):
        q, s = T.mxfp4_weight(w, compute_dtype=compute_dtype)
        out = {"weight": q, "weight_scale": s}
        if in_amax is not None:
            out["input_scale"] = T.fp8_input_scale(in_amax).reshape(())
        return out
    if fmt.quant_algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        q, s = T.int8_weight(w, w_amax, compute_dtype=compute_dtype)
        out = {"weight": q, "weight_scale": s}
        if in_amax is not None:
            out["input_scale"] = (T.safe_amax(in_amax, 127.0, "input amax") / np.float32(127.0)).astype(np.float32)
        return out
    if fmt.blocked_amax:
        q, s = T.fp8_block_weight(w, w_amax, compute_dtype=compute_dtype)
        return {"weight": q, "weight_scale": s}
    if fmt.block_size == 0:
        q, s = T.fp8_weight(w, w_amax, compute_dtype=compute_dtype)
        out = {"weight": q, "weight_scale": s}
        if in_amax is not None:
            out["input_scale"] = T.fp8_input_scale(in_amax).reshape(())
    else:
        p, s, s2 = T.nvfp4_weight(w, w_amax, block_amax=block_amax, compute_dtype=compute_dtype,
                                  block_size=fmt.block_size, global_divisor=fmt.global_divisor,
                                  fp8_norm=fmt.fp8_norm)
        out = {"weight": p, "weight_scale": s, "weight_scale_2": np.asarray(s2, np.float32).reshape(())}
        if in_amax is not None:
            in_scale = T.fp8_input_scale if fmt.input_divisor == 448 else T.nvfp4_input_scale
            out["input_scale"] = in_scale(in_amax).reshape(())
    return out


def _amaxes(fmt, w, mult):
    w32 = np.abs(np.asarray(w, np.float32))
    blk = None
    if fmt.quant_algo == INT4:  # [out, in/128, 1]: one amax per 128 inputs of a row
        w_amax = (w32.reshape(w.shape[0], -1, 128).max(-1, keepdims=True) * mult).astype(np.float32)
    elif fmt.blocked_amax:  # 2-D blocks of 128 x 128 (one block for these small weights)
        m, n = w.shape
        padded = np.zeros((-(-m // 128) * 128, -(-n // 128) * 128), np.float32)
        padded[:m, :n] = w32
        w_amax = (padded.reshape(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128).max(axis=(1, 3),
                                                                                          keepdims=True) * mult)
        w_amax = w_amax.astype(np.float32)
    elif fmt.per_channel:
        w_amax = (w32.max(axis=1) * mult).astype(np.float32)
    elif fmt.static_blocks:
        blk = (w32.reshape(w.shape[0], -1, fmt.block_size).max(-1) * np.float32(0.9)).astype(np.float32)
        w_amax = np.float32(blk.max())
    else:
        w_amax = np.float32(w32.max() * mult)
    in_amax = np.float32(3.7 * mult) if fmt.static_input_scale else None
    return w_amax, blk, in_amax


def test_every_format_satisfies_the_protocol():
    assert set(formats.FORMATS) == {"fp8", "fp8_pc_pt", "nvfp4", "nvfp4_static", "w4a16_nvfp4", "int8_wo",
                                     "fp8_pb_wo", "mxfp8", "w4a16_nvfp4_bs32", "w4a8_nvfp4_fp8", "int8_sq", "mxfp4",
                                     "w4a8_mxfp4_fp8", "int4_awq", "w4a8_awq", "nvfp4_static_four_over_six",
                                     "w4a16_nvfp4_four_over_six", "w4a16_nvfp4_static",
                                     "nvfp4_awq", "w4a16_nvfp4_awq", "nvfp4_static_awq", "w4a16_nvfp4_static_awq"}
    for name, fmt in formats.FORMATS.items():
        assert isinstance(fmt, QuantFormat), name
        assert fmt.name == name and formats.get(name) is fmt


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,mult", [("normal", 1.0), ("normal", 1.5), ("tails", 1.0), ("zero", 1.0)])
def test_export_tensors_equal_numpy_oracle(name, dtype, kind, mult):
    fmt = formats.get(name)
    for seed in range(2):
        w = _weight(seed, _shape(fmt), dtype=dtype, kind=kind)
        w_amax, blk, in_amax = _amaxes(fmt, w, mult)
        if kind == "zero" and in_amax is not None:
            in_amax = np.float32(0.0)  # an activation calibration never reached
        ours = fmt.export_tensors(jnp.asarray(w), w_amax, block_amax=blk, in_amax=in_amax, compute_dtype=dtype)
        ref = _oracle(fmt, w, w_amax, blk, in_amax, dtype)
        assert sorted(ours) == sorted(ref)
        for k in ref:
            assert _bytes(ours[k]) == _bytes(ref[k]), f"{name} {dtype} {kind} x{mult} seed {seed}: {k}"
        specs = fmt.export_specs(*w.shape, input_scale=in_amax is not None)
        assert sorted(s[0] for s in specs) == sorted(ours)
        for suffix, shape, dt in specs:
            assert tuple(ours[suffix].shape) == shape and np.dtype(ours[suffix].dtype) == dt, suffix
        for k, v in ours.items():
            if k != "weight" and np.dtype(v.dtype) == np.uint8:  # E8M0 exponent bytes: 255 would be NaN
                assert (np.asarray(v) != 255).all(), k
            elif k != "weight":
                assert np.isfinite(np.asarray(v, np.float32)).all() and (np.asarray(v, np.float32) > 0).all(), k


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_compute_dtype_other_than_the_weights(name):
    """A float32 model exported in bfloat16 (ModelOpt packs ``weight.to(dtype)``), and the reverse."""
    fmt = formats.get(name)
    for w, cd in ((_weight(3, _shape(fmt), kind="tails"), BF16),
                  (_weight(4, _shape(fmt), dtype=BF16), np.dtype(np.float32))):
        w_amax, blk, in_amax = _amaxes(fmt, w, 1.0)
        ours = fmt.export_tensors(jnp.asarray(w), w_amax, block_amax=blk, in_amax=in_amax, compute_dtype=cd)
        ref = _oracle(fmt, w, w_amax, blk, in_amax, cd)
        for k in ref:
            assert _bytes(ours[k]) == _bytes(ref[k]), f"{name} {k}"


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_inverts(name, dtype):
    fmt = formats.get(name)
    w = _weight(5, _shape(fmt), dtype=dtype, kind="tails")
    w_amax, blk, in_amax = _amaxes(fmt, w, 1.0)
    t = fmt.export_tensors(jnp.asarray(w), w_amax, block_amax=blk, in_amax=in_amax, compute_dtype=dtype)
    deq = np.asarray(fmt.dequantize(t, jnp.float32))
    assert deq.shape == w.shape and deq.dtype == np.float32
    if fmt.quant_algo == INT4:
        ref = T.int4_dequantize(np.asarray(t["weight"]), np.asarray(t["weight_scale"]))
    elif fmt.quant_algo == W4A8:
        ref = T.w4a8_dequantize(np.asarray(t["weight"]), np.asarray(t["weight_scale"]), np.asarray(t["weight_scale_2"]))
    elif fmt.quant_algo == "MXFP8":
        ref = T.mxfp8_dequantize(np.asarray(t["weight"]), np.asarray(t["weight_scale"]))
    elif fmt.quant_algo in ("mxfp4", "W4A8_MXFP4_FP8"):
        codes = np.stack([np.asarray(t["weight"]) & 15, np.asarray(t["weight"]) >> 4], -1).reshape(w.shape)
        mag = T.E2M1_VALUES[codes & 7]
        vals = np.where(codes & 8, -mag, mag).reshape(*w.shape[:-1], -1, 32)  # code 8 is -0, as ModelOpt decodes it
        ref = np.ldexp(vals, np.asarray(t["weight_scale"]).astype(np.int32)[..., None] - 127).reshape(w.shape)
    elif fmt.blocked_amax:
        q = np.asarray(t["weight"]).astype(np.float32)
        s2 = np.asarray(t["weight_scale"])[:, 0, :, 0]
        ref = q * np.repeat(np.repeat(s2, 128, 0), 128, 1)[: q.shape[0], : q.shape[1]]
    elif fmt.block_size == 0:  # FP8 and INT8: codes times the per-tensor / per-channel scale
        ref = T.fp8_dequantize(np.asarray(t["weight"]), np.asarray(t["weight_scale"]))
    else:
        ref = T.nvfp4_dequantize(np.asarray(t["weight"]), np.asarray(t["weight_scale"]),
                                 np.asarray(t["weight_scale_2"]), block_size=fmt.block_size)
    assert deq.tobytes() == ref.astype(np.float32).tobytes()
    # FP8: re-quantizing the dequantized weight with the same amax gives the same codes (a fixed point)
    if fmt.block_size == 0:
        t2 = fmt.export_tensors(jnp.asarray(deq), w_amax, block_amax=blk, in_amax=in_amax, compute_dtype=np.float32)
        assert _bytes(t2["weight"]) == _bytes(t["weight"])
    # and the error is within half a quantization step of the largest element of each row
    err = np.abs(deq - np.asarray(w, np.float32)).max(axis=1)
    assert (err <= np.abs(np.asarray(w, np.float32)).max(axis=1) * 0.5 + 1e-6).all()
    lo = np.asarray(fmt.dequantize(t, jnp.bfloat16))
    assert lo.dtype == BF16 and lo.tobytes() == deq.astype(BF16).tobytes()


def test_input_and_kv_scales_equal_oracle():
    for amax in (0.0, 0.37, 5.0, 1234.5):
        a = np.float32(amax)
        for name, ref in (("fp8", T.fp8_input_scale), ("nvfp4", T.nvfp4_input_scale),
                          ("nvfp4_static", T.nvfp4_input_scale)):
            assert _bytes(formats.get(name).input_scale(a)) == _bytes(ref(a)), (name, amax)
        assert _bytes(formats.kv_scale(a)) == _bytes(T.kv_scale(a))


def test_unknown_format_name():
    with pytest.raises(UnsupportedError, match=r"'nvfp4_svd'.*fp8, fp8_pc_pt, nvfp4, nvfp4_static, w4a16_nvfp4"):
        formats.get("nvfp4_svd")
    with pytest.raises(UnsupportedError):
        formats.get(None)


def test_non_finite_and_bad_shapes_named():
    for name in formats.FORMATS:
        fmt = formats.get(name)
        shape = _shape(fmt, (4, 32))
        w = np.ones(shape, np.float32)
        w[1, 3] = np.nan
        blk = np.ones((4, 2), np.float32) if fmt.static_blocks else None
        amax = np.ones(4, np.float32) if fmt.per_channel else np.float32(1)
        with pytest.raises(NonFiniteError, match=rf"layers\.3\.mlp\.up_proj\.weight: 1 of {w.size}"):
            fmt.export_tensors(w, amax, block_amax=blk, what="layers.3.mlp.up_proj.weight")
        bad_amax = np.full(4, np.inf, np.float32) if fmt.per_channel else np.float32(np.inf)
        with pytest.raises(NonFiniteError, match=r"up_proj\.weight amax"):
            fmt.export_tensors(np.ones(shape, np.float32), bad_amax, block_amax=blk, what="x.up_proj.weight")
        with pytest.raises(ExportError, match="negative amax"):
            fmt.export_tensors(np.ones(shape, np.float32), -amax, block_amax=blk, what="x.up_proj.weight")
        if fmt.static_input_scale:
            with pytest.raises(NonFiniteError, match=r"x\.up_proj\.input_quantizer amax"):
                fmt.export_tensors(np.ones(shape, np.float32), amax, block_amax=blk, in_amax=np.float32(np.nan),
                                   what="x.up_proj.weight")
            with pytest.raises(NonFiniteError, match="q_proj input amax"):
                fmt.input_scale(np.inf, what="q_proj input amax")
        if fmt.block_size:
            with pytest.raises(ExportError, match=r"multiple of the (NVFP4|MXFP8|MXFP4|INT4) block size"):
                fmt.export_tensors(np.ones((2, 24), np.float32), np.float32(1), block_amax=blk)
        if fmt.static_blocks:
            b = np.ones((4, 2), np.float32)
            b[0, 1] = np.nan
            with pytest.raises(NonFiniteError, match="block amax"):
                fmt.export_tensors(np.ones(shape, np.float32), np.float32(1), block_amax=b)


def test_fp8_per_channel_bf16_matches_modelopt():
    """ModelOpt divides a bf16 weight by a dimensioned float32 scale in float32 (no bf16 rounding)."""
    torch = pytest.importorskip("torch")
    qu = pytest.importorskip("modelopt.torch.export.quant_utils")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 128, generator=g) * 0.05).to(torch.bfloat16)
    amax = w.float().abs().amax(dim=1)
    q_ref = qu.to_quantized_weight(w, amax / 448.0, "fp8_pc_pt").view(torch.uint8).numpy()
    wn = w.view(torch.int16).numpy().view(BF16)
    out = formats.get("fp8_pc_pt").export_tensors(jnp.asarray(wn), amax.numpy(), compute_dtype=BF16)
    assert np.asarray(out["weight"]).view(np.uint8).tobytes() == q_ref.tobytes()
    assert np.asarray(out["weight_scale"]).tobytes() == (amax / 448.0).numpy().tobytes()
    q, _ = T.fp8_weight(wn, amax.numpy(), compute_dtype=BF16)
    assert q.view(np.uint8).tobytes() == q_ref.tobytes()


def test_format_attributes_drive_quant_config():
    assert formats.get("nvfp4").hf_layer_entry(16) == {"quant_algo": "NVFP4", "group_size": 16}
    assert formats.get("fp8_pc_pt").hf_layer_entry(0) == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}
    assert formats.by_quant_algo("NVFP4") is formats.get("nvfp4")
    assert formats.by_quant_algo("INT4_AWQ") is None


def test_pre_quant_scale_formats():
    """A linear with a pre_quant_scale exports as its format's ``pqs_format`` (ModelOpt's get_quantization_format):
    NVFP4 in blocks of 16 (dynamic or static) becomes NVFP4_AWQ, never chosen from configs alone; the others keep their
    name."""
    from jaxquant.quantizer.config import BlockSizes, QuantizerConfig

    assert formats.get("nvfp4").pqs_format == "nvfp4_awq"
    assert formats.get("w4a16_nvfp4").pqs_format == "w4a16_nvfp4_awq"
    assert formats.get("nvfp4_static").pqs_format == "nvfp4_static_awq"
    assert formats.get("w4a16_nvfp4_static").pqs_format == "w4a16_nvfp4_static_awq"
    for name in ("int8_sq", "int4_awq", "w4a8_awq", "nvfp4_awq", "w4a16_nvfp4_awq", "nvfp4_static_awq",
                 "w4a16_nvfp4_static_awq"):
        assert formats.get(name).pqs_format == name
        assert formats.get(name).quant_algo == "NVFP4_AWQ" or "awq" not in name or "nvfp4" not in name
    for name in ("fp8", "w4a16_nvfp4_bs32", "w4a8_nvfp4_fp8", "mxfp4", "nvfp4_static_four_over_six",
                 "w4a16_nvfp4_four_over_six"):
        assert formats.get(name).pqs_format is None, name
    assert formats.get("nvfp4_awq").hf_layer_entry(16) == {"quant_algo": "NVFP4_AWQ", "group_size": 16,
                                                           "has_zero_point": False, "pre_quant_scale": True}
    assert formats.by_quant_algo("NVFP4_AWQ") is formats.get("nvfp4_awq")
    fp4 = QuantizerConfig(num_bits=(2, 1), block_sizes=BlockSizes(size=16, type="dynamic", scale_bits=(4, 3)))
    assert formats.for_quantizers(fp4, fp4) is formats.get("nvfp4")
    assert formats.for_quantizers(fp4, None) is formats.get("w4a16_nvfp4")


def test_deferred_check_raises_only_when_called():
    """``export_tensors_deferred`` never reads back: the caller (the exporter) runs the check later."""
    for name in formats.FORMATS:
        fmt = formats.get(name)
        shape = _shape(fmt, (4, 32))
        w = np.ones(shape, np.float32)
        w[2, 2] = np.inf
        blk = np.ones((4, 2), np.float32) if fmt.static_blocks else None
        amax = np.ones(4, np.float32) if fmt.per_channel else np.float32(1)
        out, check = fmt.export_tensors_deferred(jnp.asarray(w), amax, block_amax=blk, what="m.o_proj.weight")
        assert set(out) >= {"weight", "weight_scale"}
        with pytest.raises(NonFiniteError, match=rf"m\.o_proj\.weight: 1 of {w.size}"):
            check()
        _, ok = fmt.export_tensors_deferred(jnp.ones(shape), amax, block_amax=blk)
        ok()  # finite: no error


def test_weight_shape_inverts_the_stored_weight():
    """``weight_shape`` (what the loader reports) of the stored ``weight`` spec is the logical ``[out, in]``."""
    for name, fmt in formats.FORMATS.items():
        out, in_ = _shape(fmt, (8, 64))
        (suffix, shape, _), *_ = fmt.export_specs(out, in_)
        assert suffix == "weight" and fmt.weight_shape(shape) == (out, in_), name
        if fmt.quant_algo not in (INT4, W4A8):  # two INT4 output rows per byte; the others along the inputs
            assert shape == (out, in_ // fmt.elements_per_byte), name
