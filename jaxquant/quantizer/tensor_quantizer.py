"""``TensorQuantizer``: one quantization site in a model, like ModelOpt's module of the same name.

A model owns one ``TensorQuantizer`` per site (``q_proj.input_quantizer``, ``q_proj.weight_quantizer``,
``self_attn.k_bmm_quantizer``, ...). Its NNX path *is* ModelOpt's quantizer name, so recipes match
it unchanged. It holds:

* ``config``: a static ``QuantizerConfig`` or ``None`` (disabled: returns its input, costs nothing
  in the compiled graph);
* ``mode``: static, one of ``"off"`` | ``"calibrate"`` | ``"fake_quant"``;
* ``amax``: a ``QuantAmax`` variable (float32), the calibrated statistic — explicit state that
  ``nnx.state(model, QuantAmax)`` collects as a pytree. ``configure`` fills it with ``UNCALIBRATED``
  (-1, which no ``max|x|`` can be) when the config needs calibrated state, so "configured but never
  calibrated" is recorded in the state itself and travels with it (calibration state files, orbax
  checkpoints): calibration (a running max from -1), ``calibrate_weights``,
  ``load_calibration_state`` and the loaders replace it; ``is_calibrated`` tells, and the exporters
  refuse a model that still holds it instead of writing placeholder scales.

* ``pre_quant_scale``: an optional ``QuantPreScale`` ``[in]`` factor applied to the tensor before anything else, also
  when the quantizer is disabled or off (ModelOpt's ``_pre_quant_scale``; SmoothQuant / AWQ set it);
* ``svdquant_lora_a`` / ``svdquant_lora_b``: optional ``QuantLowRank`` factors of a weight quantizer (SVDQuant,
  ``quantizer/lowrank.py``): the quantizer then sees the weight minus their product, after ``pre_quant_scale``;
* ``rotation``: ``(block_size, fp32)`` when the config has ``rotate: true``: the input (after ``pre_quant_scale``) is
  rotated by the normalized Hadamard matrix (``numerics/hadamard.py``) before anything else, also when the config
  disables the quantizer (ModelOpt does; ``kv_nvfp4_rotate`` rotates the queries with a disabled quantizer);
* ``calibrator``: an optional algorithm statistic collector (``collect(x, token_mask)`` in calibrate mode; see
  ``calibration/smoothing.py``); None for max calibration.

Modes:
* ``off``: identity.
* ``calibrate``: identity on the values; updates ``amax = max(amax, max|x|)`` over the positions
  where ``token_mask`` is true (padding never raises amax — a deliberate deviation from ModelOpt,
  which lets pads count).
* ``fake_quant``: quantize-dequantize with the calibrated amax (bit-exact with ModelOpt), with a
  straight-through gradient (identity), so it can be trained through.

Shapes: ``amax`` is stored broadcastable to the tensor it describes: ``()`` per tensor,
``[out, 1]`` per channel (axis 0), ``[..., K/16]`` per block (static NVFP4). With ``instances=E``
(stacked MoE experts) axis 0 of the tensor indexes the expert and amax gains a leading ``E`` axis.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.formats.registry import quantizer_format
from jaxquant.numerics import hadamard
from jaxquant.numerics._exact import round_to_dtype
from jaxquant.quantizer.lowrank import QuantLowRank, lowrank_branch, lowrank_residual
from jaxquant.quantizer.config import QuantizerConfig

Mode = Literal["off", "calibrate", "fake_quant"]


#: amax (and static-NVFP4 global amax) of a quantizer that is configured but holds no calibrated value yet.
UNCALIBRATED = -1.0


class QuantAmax(nnx.Variable):
    """Calibrated absolute-max statistic of one quantizer (float32)."""


class QuantGlobalAmax(nnx.Variable):
    """Per-tensor global amax of a static-block (NVFP4 static) quantizer (float32 scalar)."""


class QuantBias(QuantAmax):
    """Calibrated affine bias of a K/V quantizer (``fp8_affine`` / ``nvfp4_affine``; ModelOpt ``_bias_value``),
    float32 holding values of the activations' dtype. A ``QuantAmax`` so the calibration drivers carry it."""


class QuantBiasCount(QuantAmax):
    """How many calibration calls the affine bias has averaged (float32 scalar)."""


class QuantPreScale(nnx.Variable):
    """Per-input-channel factor multiplied into the tensor before quantization (ModelOpt's ``_pre_quant_scale``;
    float32 ``[in]``). On an input quantizer it is the activation side of SmoothQuant / AWQ smoothing (its values are
    those of the model dtype); on a weight quantizer the weight side (``1 / that``, exact float32), so the source
    weights are never rewritten."""


def apply_pre_quant_scale(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` along the last axis, computed in float32 and rounded to ``x``'s dtype (what torch gives for a
    model-dtype tensor times a model-dtype or float32 scale)."""
    return (x.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)


def _global_of(amax: jax.Array, instances: int | None) -> jax.Array:
    """The global amax of a static-block amax: its max (per instance for stacked experts)."""
    axes = tuple(range(1 if instances else 0, amax.ndim))
    return jnp.max(amax, axis=axes, keepdims=bool(instances))


@functools.partial(jax.jit, static_argnames=("fmt", "shape", "instances", "block_size", "with_global"))
def _weight_amax(w, pqs, *, fmt: str, shape: tuple, instances, block_size, with_global: bool):
    """``calibrate_weight``'s statistic in one compiled program per weight shape and format: the amax of ``w`` (times
    ``pqs`` when given) reduced to ``shape``, and its global amax (or None). Op by op, each operation was compiled
    once per new shape, seconds per algorithm on a GPU with a few dozen weight shapes x operations."""
    x = w if pqs is None else apply_pre_quant_scale(w, pqs)
    amax = quantizer_format(fmt).reduce_amax(masked_abs(x), shape, instances, block_size)
    return amax, (_global_of(amax, instances) if with_global else None)


def _qdq(fmt: str, block_size: int, x: jax.Array, amax: jax.Array, global_amax: jax.Array | None):
    """Quantize-dequantize ``x`` in format ``fmt``; the output has ``x``'s dtype."""
    return quantizer_format(fmt).fake_quant(x, amax, global_amax, block_size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def fake_quant_ste(fmt: str, block_size: int, x, amax, global_amax):
    """Fake quant whose derivative w.r.t. ``x`` is the identity (straight-through estimator).

    The forward value is exactly ``_qdq(...)`` (bit-exact); amax gets no gradient here.
    """
    return _qdq(fmt, block_size, x, amax, global_amax)


@fake_quant_ste.defjvp
def _fake_quant_ste_jvp(fmt, block_size, primals, tangents):
    x, amax, global_amax = primals
    tx = tangents[0]
    y = _qdq(fmt, block_size, x, amax, global_amax)
    return y, tx.astype(y.dtype) if hasattr(tx, "astype") else tx


def _mask_like(token_mask: jax.Array | None, x: jax.Array) -> jax.Array | None:
    if token_mask is None:
        return None
    m = token_mask.astype(bool)
    return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def masked_abs(x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """``|x|`` in float32 with masked token positions zeroed (``token_mask [B, S]`` or None), the input of every
    amax statistic. A bf16 / fp16 ``x`` is read back from its bits (``round_to_dtype``): the same values, but XLA
    (CPU and GPU, ``xla_allow_excess_precision``) otherwise drops the round trip float32 -> bf16 -> float32 when
    ``x`` is computed in the same program (``act(gate) * up``, RoPE, ``v_norm``), and the statistic saw the
    unrounded float32 values instead of the bf16 tensor the next op (and ModelOpt's hook) gets."""
    if x.dtype in (jnp.bfloat16, jnp.float16):
        a = jnp.abs(round_to_dtype(x.astype(jnp.float32), x.dtype))
    else:
        a = jnp.abs(x.astype(jnp.float32))
    m = _mask_like(token_mask, a)
    return a if m is None else jnp.where(m, a, 0.0)


class TensorQuantizer(nnx.Module):
    """One quantization site. See the module docstring for modes and shapes.

    Args:
      instances: number of stacked instances along axis 0 (MoE experts stored as one
        ``[E, ...]`` tensor), or None.
    """

    def __init__(self, *, instances: int | None = None):
        self.config: QuantizerConfig | None = None
        self.mode: Mode = "off"
        self.instances = instances
        self.amax: QuantAmax | None = nnx.data(None)  # data: set to a QuantAmax by configure()
        self.global_amax: QuantGlobalAmax | None = nnx.data(None)
        self.bias: QuantBias | None = nnx.data(None)
        self.bias_count: QuantBiasCount | None = nnx.data(None)
        self.pre_quant_scale: QuantPreScale | None = nnx.data(None)  # kept by configure(): it is part of the model
        self.svdquant_lora_a: QuantLowRank | None = nnx.data(None)  # SVDQuant factors (weights), kept by configure()
        self.svdquant_lora_b: QuantLowRank | None = nnx.data(None)
        self.calibrator = nnx.data(None)  # an algorithm's statistic collector (``collect(x, token_mask)``)
        self.rotation: tuple[int | None, bool] | None = None  # (block_size, fp32) of a Hadamard rotation (rotate)

    # ------------------------------------------------------------------ configuration
    @property
    def enabled(self) -> bool:
        return self.config is not None and self.config.enable

    @property
    def format(self) -> str | None:
        return self.config.format if self.enabled else None

    @property
    def block_size(self) -> int | tuple[int, int]:
        """Elements per block along the last axis (16 when unblocked); ``(rows, cols)`` for 2-D blocks."""
        bs = self.config.block_sizes if self.config is not None else None
        if bs is not None and bs.other_axes:
            return (dict(bs.other_axes).get(-2), bs.size)
        return bs.size if bs is not None and bs.size else 16

    def configure(self, config: QuantizerConfig | None, *, tensor_shape: tuple[int, ...] | None = None):
        """Set the static config and (re)create its amax state: the constant amax of a constant-amax
        config, ``UNCALIBRATED`` for one that needs calibrated state, 0 for a dynamic one (unused).

        Args:
          config: the resolved config, or None / ``enable=False`` to disable.
          tensor_shape: shape of the tensor this quantizer sees; required for per-channel and
            static-block formats (weights), optional for per-tensor ones.
        """
        # ModelOpt rotates a quantizer's input even when it is disabled (kv_nvfp4_rotate's query quantizer)
        rotation = config.rotation if config is not None else None
        if config is not None and not config.enable:
            config = None
        kind = quantizer_format(config.format) if config is not None else None  # UnsupportedError if unknown
        # NNX attribute writes cost ~30 us each and a model has ~800 quantizers: write only what changes
        if self.rotation != rotation:
            self.rotation = rotation
        self.config = config
        for name in ("amax", "global_amax", "bias", "bias_count"):
            if getattr(self, name) is not None:
                setattr(self, name, None)
        if config is None:
            return
        fixed = config.fixed_amax
        shape = self.amax_shape(tensor_shape)
        placeholder = 0.0 if config.is_dynamic else UNCALIBRATED  # a dynamic quantizer has no state
        init = jnp.full(shape, fixed if fixed is not None else placeholder, jnp.float32)
        self.amax = QuantAmax(init)
        if kind.has_global_amax:
            lead = (self.instances,) + (1,) * (len(shape) - 1) if self.instances else ()
            self.global_amax = QuantGlobalAmax(jnp.full(lead, UNCALIBRATED, jnp.float32))
        if getattr(kind, "has_bias", False):
            self.bias = QuantBias(jnp.zeros(kind.bias_shape(config, tensor_shape), jnp.float32))
            self.bias_count = QuantBiasCount(jnp.zeros((), jnp.float32))

    def uncalibrated_instances(self) -> list[int]:
        """Instances (``[0]`` for a plain quantizer) whose amax still holds ``UNCALIBRATED``.

        Empty for a disabled, dynamic or constant-amax quantizer (nothing to calibrate). Reads the
        amax back to the host.
        """
        if not self.enabled or self.amax is None or self.config.fixed_amax is not None:
            return []
        bad = None
        for var in (self.amax, self.global_amax):
            if var is None:
                continue
            a = np.asarray(var.value, np.float32)
            neg = a < 0
            if self.instances:
                neg = neg.reshape(neg.shape[0], -1).any(axis=1)
            else:
                neg = np.asarray([neg.any()])
            bad = neg if bad is None else (bad | neg)
        return [] if bad is None else [int(i) for i in np.flatnonzero(bad)]

    @property
    def is_calibrated(self) -> bool:
        """False while an enabled quantizer that needs state still holds ``UNCALIBRATED``."""
        return not self.uncalibrated_instances()

    def amax_shape(self, tensor_shape: tuple[int, ...] | None) -> tuple[int, ...]:
        """Broadcastable shape of ``amax`` for a tensor of ``tensor_shape``."""
        return quantizer_format(self.config.format).amax_shape(self.config, tensor_shape, self.instances)

    def set_mode(self, mode: Mode):
        self.mode = mode

    # ------------------------------------------------------------------ statistics
    def reduce_amax(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """max|x| reduced to ``amax``'s shape (float32), ignoring positions where mask is False (``masked_abs``)."""
        a = masked_abs(x, token_mask)
        kind = quantizer_format(self.config.format)
        return kind.reduce_amax(a, self.amax.value.shape, self.instances, self.block_size)

    def set_pre_quant_scale(self, scale) -> None:
        """Set (an ``[in]`` array) or clear (None) the pre-quantization scale (see ``QuantPreScale``)."""
        self.pre_quant_scale = None if scale is None else QuantPreScale(jnp.asarray(scale, jnp.float32))

    def set_lowrank(self, lora_a, lora_b) -> None:
        """Set (``[r, in]`` and ``[out, r]`` arrays) or clear (None, None) the SVDQuant factors (``QuantLowRank``)."""
        if (lora_a is None) != (lora_b is None):
            raise ValueError("svdquant_lora_a and svdquant_lora_b are set (or cleared) together")
        self.svdquant_lora_a = None if lora_a is None else QuantLowRank(jnp.asarray(lora_a, jnp.float32))
        self.svdquant_lora_b = None if lora_b is None else QuantLowRank(jnp.asarray(lora_b, jnp.float32))

    def scaled(self, x: jax.Array) -> jax.Array:
        """The tensor the quantizer sees: ``x`` times the pre-quantization scale, if any, minus the SVDQuant low-rank
        product, if any (``lowrank.lowrank_residual``)."""
        x = x if self.pre_quant_scale is None else apply_pre_quant_scale(x, self.pre_quant_scale.value)
        if self.svdquant_lora_a is not None:
            x = lowrank_residual(x, self.svdquant_lora_a.value, self.svdquant_lora_b.value)
        return x

    def lowrank_branch(self, x: jax.Array, precision=None) -> jax.Array | None:
        """The SVDQuant branch ``(x @ lora_a^T) @ lora_b^T`` of a weight quantizer's linear for its (pre-scaled)
        input ``x``, or None without factors."""
        if self.svdquant_lora_a is None:
            return None
        return lowrank_branch(x, self.svdquant_lora_a.value, self.svdquant_lora_b.value, precision)

    def quantize_with_own_amax(self, x: jax.Array) -> jax.Array:
        """Fake quant of ``x`` with the amax (and global amax) reduced from ``x`` itself, as a ModelOpt quantizer
        without a calibrated amax does (AWQ's search). ``x`` is used as given (no pre-quantization scale)."""
        amax = self.reduce_amax(x)
        ga = None
        if self.global_amax is not None:
            ga = jnp.max(amax, axis=tuple(range(1 if self.instances else 0, amax.ndim)), keepdims=bool(self.instances))
        return fake_quant_ste(self.config.format, self.block_size, x, amax, ga)

    def calibrate_weight(self, w: jax.Array):
        """Max calibration of a weight quantizer: amax from the weight itself (no data), after the
        pre-quantization scale."""
        if not self.enabled or self.config.fixed_amax is not None:
            return
        if self.svdquant_lora_a is not None:  # the low-rank residual, op by op as the forward computes it
            amax = self.reduce_amax(self.scaled(w))
            gamax = None if self.global_amax is None else _global_of(amax, self.instances)
        else:
            pqs = None if self.pre_quant_scale is None else self.pre_quant_scale.value
            amax, gamax = _weight_amax(w, pqs, fmt=self.config.format, shape=tuple(self.amax.value.shape),
                                       instances=self.instances, block_size=self.block_size,
                                       with_global=self.global_amax is not None)
        self.amax.value = amax
        if gamax is not None:
            self.global_amax.value = gamax

    # ------------------------------------------------------------------ forward
    def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None) -> jax.Array:
        """Apply the quantizer to ``x`` according to ``mode`` (see module docstring). A pre-quantization scale is
        applied first, also when the quantizer is disabled or off (as in ModelOpt)."""
        x = self.scaled(x)
        if self.rotation is not None:  # ModelOpt: after the pre_quant_scale, before (or without) quantization
            x = hadamard.rotate(x, *self.rotation)
        if self.calibrator is not None and self.mode == "calibrate":
            self.calibrator.collect(x, token_mask)
        if not self.enabled or self.mode == "off":
            return x
        if self.mode == "calibrate":
            if self.bias is not None:  # affine: the running mean bias, then the amax of x - bias
                from jaxquant.formats.affine import calibrate, reduced_axes

                self.bias.value, self.bias_count.value, self.amax.value = calibrate(
                    x, self.bias.value, self.bias_count.value, self.amax.value, reduced_axes(self.config), token_mask)
            elif self.config.needs_calibration:
                self.amax.value = jnp.maximum(self.amax.value, self.reduce_amax(x, token_mask))
            return x
        ga = self.global_amax.value if self.global_amax is not None else None
        if self.bias is not None and quantizer_format(self.config.format).centred_fake_quant:
            b = self.bias.value.astype(x.dtype)
            return fake_quant_ste(self.config.format, self.block_size, x - b, self.amax.value, ga) + b
        return fake_quant_ste(self.config.format, self.block_size, x, self.amax.value, ga)
