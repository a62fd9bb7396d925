"""Affine KV-cache quantizers: a calibrated bias is subtracted before quantizing (ModelOpt ``bias: {-2:, -4:,
type: static}`` on the K/V bmm quantizers; hf_ptq ``--kv_cache_qformat fp8_affine`` / ``nvfp4_affine``).

ModelOpt's K/V tensors are ``[B, heads, S, head_dim]`` and the bias keys name the axes **reduced** (``-2`` = S,
``-4`` = B): one bias per head and channel, ``[1, heads, 1, head_dim]``. jaxquant's attention hands the quantizers
``[B, S, heads, head_dim]``, so the axes are mapped (``MODELOPT_TO_OURS``) and the bias is held as
``[1, 1, heads, head_dim]`` (the attention's ``bmm_tensor_shape`` gives heads and head_dim).

Calibration (ModelOpt ``BiasCalibrator``, method ``mean``), per call: ``m = mean(x over the reduced axes)`` in x's
dtype; ``bias = m`` on the first call, else ``(bias * n + m) / (n + 1)`` in float32 rounded to x's dtype (a running
mean of the per-call means, ``n`` calls so far); then ``amax = max(amax, max|x - bias|)`` with the updated bias.
jaxquant takes the per-call mean over real tokens only (``token_mask``), as it ignores padding for amax; without
padding this is ModelOpt's statistic.

Fake quant: FP8 quantizes the centred tensor, ``fp8_fq(x - bias, amax) + bias`` (``ScaledE4M3Function``); NVFP4's
dynamic-block kernel ignores the bias in ModelOpt 0.47 (``DynamicBlockQuantizationFunction`` does not pass it on),
so ``nvfp4_affine`` fake quant is plain NVFP4 with the amax of the centred tensor, as there.

Export (``postprocess_state_dict``): ``…self_attn.k_proj.k_bias`` / ``v_proj.v_bias`` ``[1, heads, 1, head_dim]``
in the activations' dtype, beside ``k_scale`` / ``v_scale`` = amax / 448; ``kv_cache_quant_algo`` FP8 for
``fp8_affine`` (the bias is not named) and NVFP4_AFFINE for ``nvfp4_affine``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxquant.errors import UnsupportedError
from jaxquant.formats.base import PerTensorAmax
from jaxquant.numerics import fp8 as fp8_num
from jaxquant.numerics import nvfp4 as nvfp4_num

#: ModelOpt's ``[B, heads, S, D]`` axis -> jaxquant's ``[B, S, heads, D]`` axis (negative, 4-D K/V tensors).
MODELOPT_TO_OURS = {-1: -1, -2: -3, -3: -2, -4: -4}


def bias_options(config) -> tuple[tuple[int, ...], str, str]:
    """``(reduced ModelOpt axes, type, method)`` of a config's ``bias`` (frozen ``(key, value)`` pairs)."""
    items = dict(config.bias)
    axes = tuple(sorted(k for k in items if isinstance(k, int)))
    return axes, items.get("type", "static"), items.get("method", "mean")


def unsupported_reason(config) -> str | None:
    """Why jaxquant cannot run this ``bias`` (None when it can): only ModelOpt's static mean bias over axes of
    the 4-D K/V tensors is implemented."""
    axes, kind, method = bias_options(config)
    if kind != "static" or method != "mean":
        return (f"affine bias {{type: {kind}, method: {method}}} (jaxquant implements the static mean bias of "
                "ModelOpt's KV presets, bias: {-2: null, -4: null, type: static})")
    if not axes or any(a not in MODELOPT_TO_OURS for a in axes):
        return (f"affine bias over axes {list(axes)} (jaxquant maps the axes -1 .. -4 of ModelOpt's "
                "[B, heads, S, head_dim] K/V tensors only)")
    return None


def reduced_axes(config) -> tuple[int, ...]:
    """The axes of jaxquant's ``[B, S, heads, D]`` tensor the bias mean reduces (ModelOpt's mapped)."""
    why = unsupported_reason(config)
    if why is not None:
        raise UnsupportedError(why)
    return tuple(sorted(MODELOPT_TO_OURS[a] for a in bias_options(config)[0]))


def bias_shape(config, tensor_shape) -> tuple[int, ...]:
    """Shape of the bias for a ``[B, S, heads, D]`` tensor (the reduced axes 1)."""
    if tensor_shape is None or len(tensor_shape) != 4:
        raise UnsupportedError("an affine bias is implemented for the K/V bmm quantizers of jaxquant's attention "
                               f"([B, S, heads, head_dim] tensors), not for a tensor of shape {tensor_shape}.")
    red = {a % 4 for a in reduced_axes(config)}
    return tuple(1 if i in red else int(d) for i, d in enumerate(tensor_shape))


def calibrate(x, bias, count, amax, axes: tuple[int, ...], token_mask=None):
    """One calibration call: ``(bias, count, amax)`` updated with ``x`` (module docstring). ``bias`` float32 holding
    values of x's dtype, ``count`` float32 ``[]``, ``amax`` float32 ``[]``; ``token_mask`` ``[B, S]`` or None."""
    x32 = x.astype(jnp.float32)
    if token_mask is None:
        m = jnp.mean(x32, axis=axes, keepdims=True)
    else:
        w = token_mask.astype(jnp.float32).reshape(token_mask.shape + (1,) * (x.ndim - token_mask.ndim))
        w = jnp.broadcast_to(w, x.shape)
        m = jnp.sum(x32 * w, axis=axes, keepdims=True) / jnp.maximum(jnp.sum(w, axis=axes, keepdims=True), 1.0)
    m = m.astype(x.dtype).astype(jnp.float32)
    run = ((bias * count + m) / (count + 1.0)).astype(x.dtype).astype(jnp.float32)
    new_bias = jnp.where(count > 0, run, m)
    centred = jnp.abs((x - new_bias.astype(x.dtype)).astype(jnp.float32))
    if token_mask is not None:
        centred = jnp.where(token_mask.reshape(token_mask.shape + (1,) * (x.ndim - token_mask.ndim)), centred, 0.0)
    return new_bias, count + 1.0, jnp.maximum(amax, jnp.max(centred))


class AffineKVQuantizer(PerTensorAmax):
    """Per-tensor amax plus a calibrated bias (``has_bias``); ``centred_fake_quant`` says whether fake quant
    subtracts it first."""

    has_bias = True
    centred_fake_quant = True

    def amax_shape(self, config, tensor_shape, instances):
        if instances:
            raise UnsupportedError("an affine bias on stacked (MoE) quantizers is not implemented.")
        bias_shape(config, tensor_shape)  # validates the bias options and the tensor
        return ()

    def bias_shape(self, config, tensor_shape) -> tuple[int, ...]:
        """The bias variable's shape (``[1, 1, heads, head_dim]`` for ModelOpt's KV presets)."""
        return bias_shape(config, tensor_shape)


class FP8AffineQuantizer(AffineKVQuantizer):
    """FP8 per tensor around a calibrated bias (``fp8_affine``): ``fp8_fq(x - bias, amax) + bias``."""

    name = "fp8_affine"

    def fake_quant(self, x, amax, global_amax, block_size):
        return fp8_num.fake_quant(x, amax)  # x arrives centred; TensorQuantizer adds the bias back


class NVFP4AffineQuantizer(AffineKVQuantizer):
    """NVFP4 (dynamic blocks over head_dim) whose amax is calibrated around a bias (``nvfp4_affine``); fake quant
    ignores the bias, as ModelOpt's dynamic-block kernel does."""

    name = "nvfp4_affine"
    centred_fake_quant = False

    def fake_quant(self, x, amax, global_amax, block_size):
        return nvfp4_num.fake_quant_dynamic(x, amax, block_size=block_size)


QUANTIZERS = (FP8AffineQuantizer(), NVFP4AffineQuantizer())

__all__ = ["AffineKVQuantizer", "FP8AffineQuantizer", "MODELOPT_TO_OURS", "NVFP4AffineQuantizer", "QUANTIZERS",
           "bias_shape", "calibrate", "reduced_axes"]
