"""One ModelOpt attribute config per registered quantizer format, and a quantizer set up with it on a tensor.

Used where every format must be exercised the same way (the golden digests of ``tests/numerics/golden/
make_format_golden.py``, ``benchmarks/bench_numerics.py``): ``CONFIGS[name]`` is the ModelOpt quantizer attribute dict
(a list for a sequential quantizer) whose ``QuantizerConfig.format`` is ``name``; ``quantizer(name, x)`` configures a
``TensorQuantizer`` with it, reduces its amax from ``x`` itself (what max calibration of a weight gives) and puts it
in fake-quant mode.
"""

from __future__ import annotations

E4M3, E2M1, E8M0 = (4, 3), (2, 1), (8, 0)


def _mx(nb):
    return {"num_bits": nb, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": E8M0}}


def _nvfp4(block=16, kind="dynamic"):
    return {"num_bits": E2M1, "block_sizes": {-1: block, "type": kind, "scale_bits": E4M3}}


_INT4_BLOCKS = (32, 64, 128)
#: A ModelOpt attribute config (a list: a sequential quantizer) per quantizer format name.
CONFIGS: dict[str, object] = {
    "fp8": {"num_bits": E4M3},
    "fp8_per_channel": {"num_bits": E4M3, "axis": 0},
    "fp8_per_token": {"num_bits": E4M3, "type": "dynamic", "block_sizes": {-1: None, "type": "dynamic"}},
    "nvfp4": _nvfp4(),
    "nvfp4_static": _nvfp4(kind="static"),
    "nvfp4_bs32": _nvfp4(32),
    "nvfp4_static_four_over_six": {"num_bits": E2M1, "block_sizes": {-1: 16, "type": "static", "scale_bits": E4M3,
                                                                    "four_over_six": True}},
    "int8": {"num_bits": 8},
    "int8_per_channel": {"num_bits": 8, "axis": 0},
    "fp8_2d_block": {"num_bits": E4M3, "block_sizes": {-1: 128, -2: 128}},
    "mxfp8": _mx(E4M3),
    "mxfp4": _mx(E2M1),
    "mxint8": _mx(8),
    "mxfp6_e3m2": _mx((3, 2)),
    "mxfp6": _mx((2, 3)),
    "fp8_affine": {"num_bits": E4M3, "bias": {-2: None, -4: None, "type": "static"}},
    "nvfp4_affine": {**_nvfp4(), "bias": {-2: None, -4: None, "type": "static"}},
    **{f"int4_block{b}": {"num_bits": 4, "block_sizes": {-1: b, "type": "static"}} for b in _INT4_BLOCKS},
    **{f"int4_block{b}+fp8": [{"num_bits": 4, "block_sizes": {-1: b, "type": "static"}}, {"num_bits": E4M3}]
       for b in _INT4_BLOCKS},
}


def is_kv_only(name: str) -> bool:
    """True for formats defined on ``[B, S, heads, head_dim]`` K/V tensors only (a per-head bias: ``*_affine``)."""
    cfg = CONFIGS[name]
    return isinstance(cfg, dict) and "bias" in cfg


def quantizer(name: str, x, bias=None):
    """A ``TensorQuantizer`` for format ``name`` on ``x`` (shape fixed by it), amax from ``x``, in fake-quant mode;
    ``bias`` (``[1, 1, heads, head_dim]``) for the affine K/V formats (zero when None)."""
    import jax.numpy as jnp

    from jaxquant.quantizer import TensorQuantizer
    from jaxquant.quantizer.sequential import config_from_dict

    q = TensorQuantizer()
    q.configure(config_from_dict(CONFIGS[name]), tensor_shape=tuple(x.shape))
    if q.bias is not None and bias is not None:
        q.bias.value = jnp.asarray(bias, jnp.float32)
    q.calibrate_weight(x)
    q.set_mode("fake_quant")
    return q


def export_inputs(fmt: str, w):
    """``(w_amax, block_amax, in_amax)`` for exporting ``w`` as registered format ``fmt``: its first weight config's
    quantizer max-calibrated on ``w``, and (formats with an ``input_scale``) an input quantizer calibrated on ``w``
    too, read as the exporter reads a model's quantizers."""
    from jaxquant.export.linears import _amaxes
    from jaxquant.formats.registry import FORMATS
    from jaxquant.quantizer import TensorQuantizer

    qf = FORMATS[fmt]
    wq = quantizer(qf.weight_config_formats[0], w)
    icfg = qf.activation_config() if qf.static_input_scale else None
    iq = None
    if icfg is not None:
        iq = TensorQuantizer()
        iq.configure(icfg, tensor_shape=tuple(w.shape))
        iq.calibrate_weight(w)
    return _amaxes(fmt, wq, iq, icfg, None)


__all__ = ["CONFIGS", "export_inputs", "is_kv_only", "quantizer"]
