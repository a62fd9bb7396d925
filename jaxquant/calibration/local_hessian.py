"""Local-Hessian calibration (ModelOpt's ``local_hessian``, ``LocalHessianCalibConfig``): the ``mse`` weight search
with each candidate's error weighted by the inputs the weight sees.

``local_hessian_calibrate`` does what ModelOpt's does, in the same order:

1. ``max`` (weights from the weights, activations from the data), then fused static-NVFP4 siblings share one
   ``global_amax`` (``mse.share_global_amax``, ModelOpt's shared-state finalize inside ``max_calibrate``);
2. a second forward over the same data with every **weight** quantizer off and every other quantizer
   fake-quantizing with its calibrated amax; each linear with an enabled weight quantizer accumulates, from its
   input ``X`` as the linear receives it (before its input quantizer and any pre_quant_scale: ModelOpt's forward
   pre-hook), ``H_b = sum over tokens of X_b^T X_b`` per block of ``block_size`` input columns (float32,
   ``[in / bs, bs, bs]``, ``HessianCollector``), divided by the token count at the end;
3. the ``mse`` weight search (``mse.refine_weights``) with the error of a candidate, per output row ``c`` and block
   ``b``, ``dw_cb^T H_b dw_cb`` (``dw = w - QDQ(w)``) instead of ``sum dw^2``. A weight whose input width is not a
   multiple of ``block_size`` falls back to the squared error (ModelOpt warns the same).

Options: the ``mse`` ones (``step_size``, ``start_multiplier``, ``stop_multiplier``, ``fp8_scale_sweep``, here true
by default), ``block_size`` (16), ``debug`` (keep the normalised Hessians: ``stats.local_hessians``),
``distributed_sync`` (ignored: one process), ``shared_states``, ``layerwise`` (both passes layer by layer, without a
checkpoint directory) and ``moe_calib_experts_ratio`` (refused, as for ``max``).

Deviations: padding tokens count in neither ``H`` nor the token count (ModelOpt's hook counts them; jaxquant's
statistics never see pads). Stacked MoE experts are refused (ModelOpt hooks HF's fused experts per expert; not
implemented here yet). No calibration data raises ``DataError`` (ModelOpt warns and skips the algorithm, leaving
the weights uncalibrated).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.calibration.sites import Site
from jaxquant.calibration.smoothing import SmoothingStat
from jaxquant.errors import DataError, RecipeError, UnsupportedError
from jaxquant.numerics._exact import round_to_dtype
from jaxquant.quantizer.tensor_quantizer import TensorQuantizer

log = logging.getLogger("jaxquant.calibration")

#: LocalHessianCalibConfig's own fields (besides the mse ones) and their defaults.
LOCAL_HESSIAN_DEFAULTS = {"step_size": 0.1, "start_multiplier": 0.25, "stop_multiplier": 4.0,
                          "fp8_scale_sweep": True, "block_size": 16, "debug": False}
#: Fields shared with MaxCalibConfig, parsed as ``max`` parses them.
SHARED_OPTIONS = ("distributed_sync", "shared_states", "layerwise", "moe_calib_experts_ratio")


def block_hessian(x: jax.Array, block_size: int = 16, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(sum over tokens of X_b^T X_b [in / bs, bs, bs] float32, number of tokens)`` of one batch of a linear's
    input ``x [..., in]`` (``token_mask [...]``: positions that count; padding contributes nothing).

    Raises:
      ValueError: ``in`` not a multiple of ``block_size`` (ModelOpt falls back to the squared error there).
    """
    k = x.shape[-1]
    if k % block_size:
        raise ValueError(f"input width {k} is not a multiple of the Hessian block size {block_size}")
    xs = x.reshape(-1, k).astype(jnp.float32)
    if token_mask is None:
        n = jnp.asarray(xs.shape[0], jnp.int32)
    else:
        m = token_mask.reshape(-1).astype(bool)
        xs = jnp.where(m[:, None], xs, 0.0)
        n = jnp.sum(m, dtype=jnp.int32)
    xb = xs.reshape(xs.shape[0], k // block_size, block_size)
    h = jnp.einsum("tnb,tnd->nbd", xb, xb, precision=jax.lax.Precision.HIGHEST)
    return h, n


def hessian_error(d: jax.Array, hessian: jax.Array) -> jax.Array:
    """The local-Hessian error of a weight difference ``d [..., out, in]``: per output row and block of ``bs``
    columns ``d_b^T H_b d_b`` (``hessian [..., in / bs, bs, bs]``, already divided by the token count), repeated on
    the block's ``bs`` elements (as ModelOpt's ``local_hessian_error`` returns it), so summing over a block gives
    ``bs`` times the block's error."""
    *lead, out, k = d.shape
    n, bs = hessian.shape[-3], hessian.shape[-1]
    db = d.astype(jnp.float32).reshape(*lead, out, n, bs)
    hd = jnp.einsum("...nbd,...cnd->...cnb", hessian.astype(jnp.float32), db, precision=jax.lax.Precision.HIGHEST)
    loss = jnp.sum(db * hd, axis=-1)
    return jnp.broadcast_to(loss[..., None], (*lead, out, n, bs)).reshape(d.shape)


# ----------------------------------------------------------------------------------------------- options
def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed ``algorithm`` options of ``local_hessian``: ``{"settings": MseSettings, "block_size": int,
    "debug": bool, ...}`` plus what the fields shared with ``max`` give (``shared_patterns``, ``layerwise``).

    Raises:
      UnsupportedError: an option LocalHessianCalibConfig does not have, or ``moe_calib_experts_ratio``.
      RecipeError: a bad value (``block_size`` not a positive integer, the ``mse`` fields as ``mse`` checks them).
    """
    from jaxquant.calibration.algorithms import parse_max_options, refuse_unknown
    from jaxquant.calibration.mse import parse_settings

    refuse_unknown(options, (*LOCAL_HESSIAN_DEFAULTS, *SHARED_OPTIONS), "local_hessian")
    out = parse_max_options({k: v for k, v in options.items() if k in SHARED_OPTIONS})
    out["settings"] = parse_settings(options, LOCAL_HESSIAN_DEFAULTS, "local_hessian")
    bs = options.get("block_size", 16)
    bs = 16 if bs is None else bs
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        raise RecipeError(f"algorithm.block_size (local_hessian) must be a positive integer, got {bs!r}")
    out["block_size"] = bs
    debug = options.get("debug", False)
    out["debug"] = bool(debug) if debug is not None else False
    return out


# ----------------------------------------------------------------------------------------------- collection
class HessianCollector(nnx.Module):
    """Pass-2 calibrator of one linear: the running per-block ``sum X_b^T X_b`` of its input and the token count.

    It takes the linear's call (``linear_call``): the statistic comes from the input as the linear receives it,
    and the linear then computes its output with the input quantizer fake-quantizing, the weight as the weight
    quantizer gives it (off in pass 2: the source weight) and the output quantizer as set."""

    def __init__(self, in_features: int, block_size: int):
        self.block_size = block_size
        self.hessian = SmoothingStat(jnp.zeros((in_features // block_size, block_size, block_size), jnp.float32))
        self.tokens = SmoothingStat(jnp.zeros((), jnp.float32))

    def collect(self, x, token_mask):  # pragma: no cover - the linear's hook takes the call
        return None

    def linear_call(self, linear, x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
        """The linear's output (weight quantizer as set); adds this batch's ``X_b^T X_b`` and token count."""
        xs = round_to_dtype(x.astype(jnp.float32), x.dtype) if x.dtype in (jnp.bfloat16, jnp.float16) else x
        h, n = block_hessian(xs, self.block_size, token_mask)
        self.hessian.value = self.hessian.value + h
        self.tokens.value = self.tokens.value + n.astype(jnp.float32)
        iq = linear.input_quantizer
        iq.set_mode("fake_quant")  # static while tracing; restored before the call returns
        try:
            xq = iq(x, token_mask=token_mask)
        finally:
            iq.set_mode("calibrate")
        y = linear.matmul(xq, linear.weight_quantizer(linear.weight[...]))
        return linear.output_quantizer(y, token_mask=token_mask)


def hessian_sites(sites: list[Site], block_size: int) -> list[Site]:
    """The weight sites whose linear collects a Hessian (ModelOpt's dense hook: an enabled weight quantizer on a 2-D
    weight whose input width is a multiple of ``block_size``); the others are searched with the squared error.

    Raises:
      UnsupportedError: a stacked MoE expert weight (not implemented), or an enabled weight quantizer whose owner
        is not a jaxquant ``Linear`` (no input to pair it with).
    """
    out = []
    for s in sites:
        if not s.is_gemm_weight or s.config is None:
            continue
        if s.stacked:
            raise UnsupportedError(f"local_hessian on stacked MoE experts ({s.path}) is not implemented yet; use "
                                   "mse with fp8_scale_sweep: true for these weights.")
        iq = getattr(s.parent, "input_quantizer", None)
        if not isinstance(iq, TensorQuantizer) or not callable(getattr(s.parent, "matmul", None)) \
                or s.attr != "weight_quantizer":
            raise UnsupportedError(f"local_hessian: {s.path} is not a jaxquant Linear's weight quantizer (its input "
                                   "cannot be collected); calibrate this model with mse.")
        w = s.weight()
        if w.ndim != 2:
            continue
        if w.shape[1] % block_size:
            warnings.warn(f"local_hessian: {s.module_names[0]} input features ({w.shape[1]}) not divisible by "
                          f"block_size ({block_size}); falling back to plain MSE for this weight.", stacklevel=2)
            continue
        qb = getattr(s.quantizer.config.block_sizes, "size", None)
        if qb is not None and qb != block_size:
            warnings.warn(f"local_hessian: block_size ({block_size}) != quantizer scale block ({qb}) for "
                          f"{s.module_names[0]}; Hessian weighting will not align with the scale blocks.",
                          stacklevel=2)
        out.append(s)
    return out


def collect_hessians(model: Any, sites: list[Site], data: Any, block_size: int, *, layerwise: bool = False,
                     todo: list[Site] | None = None, **kw) -> tuple[dict[str, np.ndarray], Any]:
    """Pass 2 (module doc, step 2): ``({weight site path: H / tokens [in / bs, bs, bs] float32}, stats)``.

    Linears that saw no token get no entry (squared error, as ModelOpt's ``None`` error function). ``todo``: the
    sites that collect (default ``hessian_sites``). ``kw``: ``run_calibration``'s keywords (``forward``,
    ``progress``, ``total_tokens``, ``max_seq_len``, ``mesh``).
    """
    from jaxquant.calibration.max import run_calibration, run_forward_loop

    todo = hessian_sites(sites, block_size) if todo is None else todo
    for s in sites:
        on = s.quantizer.enabled and s.role != "weight"
        s.quantizer.set_mode("fake_quant" if on else "off")
    iqs, saved = [], []
    for s in todo:
        iq = s.parent.input_quantizer
        saved.append(iq.calibrator)  # another algorithm's (nvfp4_act_headroom's histogram) comes back after
        iq.calibrator = HessianCollector(int(s.weight().shape[1]), block_size)
        iq.set_mode("calibrate")
        iqs.append(iq)
    try:
        if callable(data) and not hasattr(data, "__iter__"):
            stats = run_forward_loop(model, sites, data)
        elif layerwise:
            from jaxquant.calibration.layerwise import run_calibration_layerwise

            stats = run_calibration_layerwise(model, sites, data, forward=kw.get("forward"),
                                              progress=kw.get("progress", True), max_seq_len=kw.get("max_seq_len"),
                                              mesh=kw.get("mesh"))
        else:
            stats = run_calibration(model, sites, data, **kw)
        out = {}
        for s, iq in zip(todo, iqs):
            n = float(iq.calibrator.tokens.value)
            if n > 0:
                out[s.path] = np.asarray(iq.calibrator.hessian.value, np.float32) / np.float32(n)
    finally:
        for iq, c in zip(iqs, saved):
            iq.calibrator = c
    return out, stats


# ----------------------------------------------------------------------------------------------- the algorithm
def local_hessian_calibrate(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None,
                            progress: bool = True, layerwise: bool = False, **max_kw):
    """ModelOpt's ``local_hessian_calibrate`` up to (not including) ``finalize`` (module doc); ``options`` from
    ``parse_options``; the other keywords are ``max_calibrate``'s. Returns the statistics of both forward passes
    (``local_hessians``: the normalised Hessians by weight site path when ``debug``).

    Raises:
      DataError: no calibration data (the Hessians need activations).
      UnsupportedError: a layerwise checkpoint directory, stacked experts (``hessian_sites``).
    """
    import collections.abc

    from jaxquant.calibration.max import max_calibrate
    from jaxquant.calibration.mse import refine_weights, share_global_amax

    opts = dict(options or parse_options({}))
    if data is None:
        raise DataError("local_hessian needs calibration data (the per-block input Hessians).")
    if max_kw.get("layerwise_checkpoint_dir") is not None:
        raise UnsupportedError("local_hessian with a layerwise checkpoint directory is not implemented yet (its "
                               "second forward pass is not checkpointed); drop layerwise.checkpoint_dir.")
    if isinstance(data, collections.abc.Iterator):
        data = list(data)  # two passes
    todo = hessian_sites(sites, opts["block_size"])  # refuse what cannot run before the first pass
    max_kw.pop("layerwise_save_every", None)
    stats = max_calibrate(model, sites, data, progress=progress, layerwise=layerwise, **max_kw)
    share_global_amax(sites, opts.get("shared_patterns"))
    pass_kw = {k: max_kw[k] for k in ("forward", "total_tokens", "max_seq_len", "mesh") if k in max_kw}
    hessians, stats2 = collect_hessians(model, sites, data, opts["block_size"], layerwise=layerwise, todo=todo,
                                        progress=progress, **pass_kw)
    t0 = time.perf_counter()
    metrics = {p: jnp.asarray(h) for p, h in hessians.items()}
    refine_weights(sites, opts["settings"], metrics=metrics, progress=progress)
    stats.search_s = time.perf_counter() - t0
    stats.batches += max(stats2.batches, 0)
    stats.tokens += stats2.tokens
    stats.compile_s += stats2.compile_s
    stats.run_s += stats2.run_s
    if opts.get("debug"):
        stats.local_hessians = hessians  # type: ignore[attr-defined]
    log.info("local_hessian: %d weight(s) with a Hessian metric", len(hessians))
    return stats


__all__ = ["HessianCollector", "LOCAL_HESSIAN_DEFAULTS", "block_hessian", "collect_hessians", "hessian_error",
           "hessian_sites", "local_hessian_calibrate", "parse_options"]
