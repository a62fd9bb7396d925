"""The ``QuantFormat`` protocol: everything jaxquant knows about one ModelOpt weight format.

A format object answers every question the exporter, the loader and ``hf_quant_config.json``
ask about a format, so no caller compares format strings:

* identity: ``name`` (ModelOpt's format string, ``"fp8"``, ``"nvfp4"``, ...), ``quant_algo``
  (its ``hf_quant_config.json`` name), ``block_size`` (0 when unblocked);
* its tensors: ``export_specs(out, in_)`` (names, shapes, dtypes, without computing anything)
  and ``export_tensors(weight, w_amax, ...)`` (the values, computed by the jitted JAX numerics of
  ``jaxquant.numerics`` where the weight lives), ``input_scale(amax)``, and the inverse
  ``dequantize(tensors, dtype)`` used by ``load_quantized``;
* the export rules that depend on it (``static_input_scale``, ``shares_fused_scales``,
  ``per_channel``, ``static_blocks``, ...) and its ``hf_quant_config`` entries.

Adding a format is one module that defines a class satisfying this protocol plus one line in
``registry.py`` (docs/numerics.md, "Formats").

Non-finite values: ``export_tensors`` reduces ``isfinite`` over the weight and the amaxes on the
device inside the same jitted computation and reads back one small vector per tensor; NaN/Inf
raises ``NonFiniteError`` naming the tensor, a negative amax ``ExportError`` (docs/export.md,
"Non-finite values and zero amax").
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant.errors import ExportError, NonFiniteError

TensorSpec = tuple[str, tuple[int, ...], np.dtype]
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
F32 = np.dtype(np.float32)
U8 = np.dtype(np.uint8)


@runtime_checkable
class QuantFormat(Protocol):
    """One ModelOpt weight format (see the module docstring)."""

    name: str  # ModelOpt format string: "fp8", "fp8_pc_pt", "nvfp4", "nvfp4_static", "w4a16_nvfp4"
    quant_algo: str  # hf_quant_config.json quant_algo: "FP8", "NVFP4", ...
    block_size: int  # elements per weight block (0: per tensor / per channel)
    weight_config_formats: tuple[str, ...]  # QuantizerConfig.format values whose weights export as this
    static_input_scale: bool  # a calibrated (static) input quantizer is exported as ``input_scale``
    shares_fused_scales: bool  # fused siblings (q/k/v, gate/up) share weight_scale_2 / input_scale
    per_channel: bool  # the weight amax is per output channel ([out]), not one number
    static_blocks: bool  # the block scales come from the quantizer's calibrated per-block amax
    sidecar_weight_amax: bool  # the exact weight amax goes into the export's sidecar (loader bit-exactness)
    input_divisor: float  # input_scale = amax / input_divisor (the loader inverts it)
    elements_per_byte: int  # weight elements per stored element along the input axis (2 for packed E2M1)
    pqs_format: str | None  # the format this one exports as with a pre_quant_scale (None: not exportable)
    pqs_into_norm: bool  # fused siblings' pre_quant_scale is folded into their norm (AWQ formats)
    pqs_into_linear: bool  # o_proj / down_proj pre_quant_scale folded into v_proj / up_proj (NVFP4_AWQ)
    resmooth_keeps_global_amax: bool  # a re-smoothed weight gets new block amax, not a new global amax

    def export_specs(self, out: int, in_: int, *, input_scale: bool = False) -> list[TensorSpec]:
        """``[(suffix, shape, numpy dtype)]`` of the tensors of one ``[out, in_]`` linear, file order."""
        ...

    def export_tensors(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                       what: str = "weight") -> dict[str, jax.Array]:
        """The tensors of one linear as the checkpoint stores them (keys: the ``export_specs`` suffixes)."""
        ...

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        """``export_tensors`` without waiting for the device: the tensors (still being computed) and the
        finiteness check, to be called once they are (``check.ready()``; calling it blocks)."""
        ...

    def input_scale(self, amax) -> jax.Array:
        """``input_scale`` (float32, amax's shape) for an activation amax (0 -> the maxbound)."""
        ...

    def dequantize(self, tensors: dict[str, Any], dtype=jnp.float32) -> jax.Array:
        """The weight ``[out, in]`` in ``dtype`` from its checkpoint tensors (``weight``, scales)."""
        ...

    def activation_config(self):
        """The ``QuantizerConfig`` of the activations a checkpoint ``input_scale`` of this format
        implies (``load_quantized`` fake-quantizes inputs with it)."""
        ...

    def dynamic_activation_config(self):
        """The config of activations quantized at run time with no ``input_scale`` (None: static or none)."""
        ...

    def hf_layer_entry(self, block: int) -> dict[str, Any]:
        """The per-layer entry of ``hf_quant_config.json`` (``quant_algo`` and, blocked, ``group_size``)."""
        ...

    def weight_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The logical weight shape ``[..., out, in]`` of a stored (packed) weight of this format."""
        ...

    def config_group(self, group_size: int | None) -> dict[str, Any]:
        """The compressed-tensors ``config_groups`` entry of ``config.json["quantization_config"]``."""
        ...


@runtime_checkable
class QuantizerFormat(Protocol):
    """What one ``TensorQuantizer`` does for a ``QuantizerConfig.format`` (fake quant and its statistic).

    The export side of a format is a ``QuantFormat``; this is its calibration / fake-quant side, keyed by
    the quantizer's format string in ``registry.QUANTIZER_FORMATS``.
    """

    name: str  # QuantizerConfig.format: "fp8", "fp8_per_channel", "nvfp4", "nvfp4_static"
    has_global_amax: bool  # keeps a per-tensor global amax next to its amax (static NVFP4)
    per_tensor_amax: bool  # one amax per tensor (per instance): rows of a tensor can be quantized apart
    fused_weight_amax: bool  # fused siblings (q/k/v, gate/up) share their weight (global) amax

    def amax_shape(self, config, tensor_shape: tuple[int, ...] | None, instances: int | None) -> tuple[int, ...]:
        """Shape of the amax (broadcastable to the tensor; ``instances`` stacked experts lead)."""
        ...

    def reduce_amax(self, a: jax.Array, amax_shape: tuple[int, ...], instances: int | None,
                    block_size: int) -> jax.Array:
        """``a`` (``|x|`` in float32, masked) reduced to ``amax_shape``."""
        ...

    def fake_quant(self, x: jax.Array, amax: jax.Array, global_amax: jax.Array | None, block_size: int) -> jax.Array:
        """Quantize-dequantize ``x`` (bit-exact with ModelOpt); the output has ``x``'s dtype."""
        ...

    def amax_per_element(self, amax: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
        """The amax bounding each element of a tensor of ``shape`` (float32, broadcastable to it)."""
        ...


class PerTensorAmax:
    """Quantizer-format helpers for one amax per tensor (per instance for stacked experts)."""

    has_global_amax: ClassVar[bool] = False
    per_tensor_amax: ClassVar[bool] = True
    fused_weight_amax: ClassVar[bool] = False

    def amax_shape(self, config, tensor_shape, instances):
        if instances:
            nd = len(tensor_shape) if tensor_shape is not None else 1
            return (instances,) + (1,) * (nd - 1)
        return ()

    def reduce_amax(self, a, amax_shape, instances, block_size):
        if instances:
            return jnp.max(a.reshape(a.shape[0], -1), axis=1).reshape(amax_shape)
        return jnp.max(a)

    def amax_per_element(self, amax, shape, block_size):
        return jnp.asarray(amax, jnp.float32)

    def __repr__(self) -> str:
        return f"<QuantizerFormat {self.name}>"


class ElementwiseQuantizer(PerTensorAmax):
    """A quantizer format whose fake quant is one elementwise kernel ``kernel(x, amax)`` (FP8, INT8), with the
    amax per tensor; mix in ``PerChannelAmax`` first for one amax per channel."""

    kernel: ClassVar[Any]

    def fake_quant(self, x, amax, global_amax, block_size):
        return type(self).kernel(x, amax)


class PerChannelAmax:
    """Quantizer-format helpers for one amax per channel along ``config.axis`` (and per stacked expert)."""

    per_tensor_amax: ClassVar[bool] = False

    def amax_shape(self, config, tensor_shape, instances):
        if tensor_shape is None:
            raise ValueError("per-channel quantizers need tensor_shape")
        axes = config.axis if isinstance(config.axis, tuple) else (config.axis,)
        off = 1 if instances else 0
        axes = tuple((a % (len(tensor_shape) - off)) + off for a in axes)
        keep = set(axes) | ({0} if instances else set())
        return tuple(d if i in keep else 1 for i, d in enumerate(tensor_shape))

    def reduce_amax(self, a, amax_shape, instances, block_size):
        axes = tuple(i for i, d in enumerate(amax_shape) if d == 1)
        return jnp.max(a, axis=axes, keepdims=True)


class FormatBase:
    """Shared defaults and helpers of the concrete formats (not part of the protocol)."""

    name: ClassVar[str]
    quant_algo: ClassVar[str]
    block_size: ClassVar[int] = 0
    weight_config_formats: ClassVar[tuple[str, ...]] = ()
    static_input_scale: ClassVar[bool] = False
    shares_fused_scales: ClassVar[bool] = False
    per_channel: ClassVar[bool] = False
    static_blocks: ClassVar[bool] = False
    blocked_amax: ClassVar[bool] = False  # the weight amax keeps its block shape (2-D blocks), not one number
    sidecar_weight_amax: ClassVar[bool] = False
    #: whether ``convert_hf_quant_config_format`` writes ``config_groups`` when every layer has this format
    config_groups_when_uniform: ClassVar[bool] = True
    input_divisor: ClassVar[float] = 1.0
    elements_per_byte: ClassVar[int] = 1
    #: the format a linear of this format exports as when its input carries a ``pre_quant_scale`` (SmoothQuant /
    #: AWQ; ModelOpt's ``get_quantization_format``); None: such a linear cannot be exported (``export/prequant.py``)
    pqs_format: ClassVar[str | None] = None
    #: fused siblings' common ``pre_quant_scale`` is folded into the norm that feeds them (ModelOpt: ``awq`` formats)
    pqs_into_norm: ClassVar[bool] = False
    #: when the model's first quantized linear has this format, o_proj's / down_proj's ``pre_quant_scale`` is folded
    #: into v_proj's / up_proj's output rows (ModelOpt's ``fuse_prequant_to_linear``, NVFP4_AWQ)
    pqs_into_linear: ClassVar[bool] = False
    #: a weight re-smoothed at export (``export/prequant.py``) has its per-block amax recomputed but keeps its
    #: calibrated global amax: ModelOpt re-collects only a static NVFP4 quantizer's ``_amax``, not ``global_amax``
    resmooth_keeps_global_amax: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<QuantFormat {self.name} ({self.quant_algo})>"

    def dynamic_activation_config(self):
        """The ``QuantizerConfig`` of activations this format quantizes at run time without an ``input_scale``
        (MXFP8 blocks, FP8 per token); None when a checkpoint's activations are static or unquantized."""
        return None

    def weight_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The logical ``[..., out, in]`` of a stored weight (``elements_per_byte`` codes per byte along the input
        axis)."""
        return (*stored[:-1], stored[-1] * self.elements_per_byte)

    def hf_layer_entry(self, block: int) -> dict[str, Any]:
        if self.block_size:
            return {"quant_algo": self.quant_algo, "group_size": block}
        return {"quant_algo": self.quant_algo}

    def export_tensors(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                       what: str = "weight") -> dict[str, jax.Array]:
        out, check = self.export_tensors_deferred(weight, w_amax, block_amax=block_amax, in_amax=in_amax,
                                                  compute_dtype=compute_dtype, what=what)
        check()
        return out

    def match(self, weight, input) -> bool:
        """True when a linear with these enabled weight / input ``QuantizerConfig`` exports as this
        format; raises ``UnsupportedError`` for a weight format of this family with activations that
        cannot be exported with it."""
        return weight.format in self.weight_config_formats


class WeightOnlyFormat(FormatBase):
    """A weight-only format whose tensors are ``weight`` + ``weight_scale`` from one jitted kernel
    ``kernel(w, amax, compute_dtype=...) -> (tensors, finiteness stats)`` and back through
    ``dequantizer(weight, weight_scale, dtype)`` (INT8 W8A16, FP8_PB_WO). Activations stay unquantized."""

    kernel: ClassVar[Any]
    dequantizer: ClassVar[Any]

    def export_tensors_deferred(self, weight, w_amax, *, block_amax=None, in_amax=None, compute_dtype=None,
                                what: str = "weight") -> tuple[dict[str, jax.Array], DeferredCheck]:
        w = jnp.asarray(weight)
        cd = jnp.dtype(compute_dtype) if compute_dtype is not None else w.dtype
        amax = jnp.asarray(w_amax, jnp.float32)
        out, stats = type(self).kernel(w, amax, compute_dtype=cd)
        return out, DeferredCheck(stats, what, w, amax)

    def input_scale(self, amax, what: str = "input amax") -> jax.Array:
        from jaxquant.errors import UnsupportedError

        raise UnsupportedError(f"{what}: {self.quant_algo} leaves activations unquantized; it has no input_scale.")

    def activation_config(self):
        return None

    def dequantize(self, tensors, dtype=jnp.float32) -> jax.Array:
        return type(self).dequantizer(jnp.asarray(tensors["weight"]), jnp.asarray(tensors["weight_scale"], jnp.float32),
                                      jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------------- checks
def finite_stats(x) -> tuple[jax.Array, jax.Array]:
    """``(count of NaN/Inf, min)`` of ``x`` in float32, traced (call inside a jitted function)."""
    x = jnp.asarray(x)
    x32 = x.astype(jnp.float32)
    bad = jnp.sum(~jnp.isfinite(x32), dtype=jnp.int32)
    lo = jnp.min(x32) if x32.size else jnp.float32(0)
    return bad, lo


def raise_on_bad(stats: dict[str, tuple[Any, Any]], sizes: dict[str, int], what: dict[str, str],
                 amax_keys=()) -> None:
    """Read the device-side ``(bad count, min)`` pairs back once and raise like the documented checks.

    Checked in ``what``'s order: the first offending tensor is reported. Keys in ``amax_keys`` must also be >= 0.
    """
    host = jax.device_get(stats)
    for key, name in what.items():  # ``what``'s order: the first offending tensor is reported
        if key not in host:
            continue
        bad, lo = host[key]
        n = int(bad)
        if n:
            raise NonFiniteError(
                f"{name}: {n} of {sizes[key]} values are NaN or Inf; a quantized checkpoint cannot be "
                "exported. Check the source weights / calibration data of this layer."
            )
        if key in amax_keys and float(lo) < 0:
            raise ExportError(f"{name}: negative amax {float(lo)}; amax must be max|x| >= 0.")


class DeferredCheck:
    """The finiteness check of one ``export_tensors`` computation, read back when called.

    ``ready()`` says (without blocking) whether the device has computed it; calling it reads the
    stats back (blocking if needed) and raises ``NonFiniteError`` / ``ExportError`` naming the tensor:
    the weight is ``what``, its amaxes ``what amax`` / ``what block amax``, the input
    ``<module>.input_quantizer amax``.
    """

    def __init__(self, stats, what: str, weight, w_amax, block_amax=None, in_amax=None):
        self.stats = stats
        self.names = {"w": what, "amax": what + " amax", "blk": what + " block amax",
                      "in": what.rsplit(".", 1)[0] + ".input_quantizer amax"}
        self.sizes = {k: (0 if a is None else int(a.size))
                      for k, a in (("w", weight), ("amax", w_amax), ("blk", block_amax), ("in", in_amax))}

    def ready(self) -> bool:
        return all(getattr(x, "is_ready", lambda: True)() for x in jax.tree_util.tree_leaves(self.stats))

    def __call__(self) -> None:
        raise_on_bad(self.stats, self.sizes, self.names, amax_keys=("amax", "in"))


def check_amax(amax, what: str) -> None:
    """``NonFiniteError`` / ``ExportError`` unless the (small) ``amax`` is finite and >= 0. A host value (numpy, a
    Python number) is checked on the host: no device round trip per call (the export checks one per linear)."""
    if isinstance(amax, jax.Array):
        stats, size = _stats(amax), int(amax.size)
    else:
        a = np.asarray(amax, np.float32)
        stats, size = (np.sum(~np.isfinite(a)), a.min() if a.size else np.float32(0)), int(a.size)
    raise_on_bad({"a": stats}, {"a": size}, {"a": what}, amax_keys=("a",))


@jax.jit
def _stats(x):
    return finite_stats(x)
