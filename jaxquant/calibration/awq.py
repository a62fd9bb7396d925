"""AWQ-lite (ModelOpt's ``awq_lite``, ``AWQLiteCalibConfig``): a per-linear activation-aware smoothing scale chosen by
searching one exponent ``alpha``.

For every linear with an enabled weight quantizer (``smoothing.smooth_linears``):

1. **Cache pass** (one calibration forward, unquantized): ``act_scale = mean over batches of (mean over the batch's
   real tokens of |x|)`` per input channel (``AwqCache``, rounded to the activation dtype per batch as torch's
   ``mean`` is); a statically quantized input also collects its per-channel amax; every other activation quantizer
   is max-calibrated. ``weight_scale = mean over rows of |W| / (block amax of |W| + tiny)`` per input column (blocks
   of the weight quantizer; the whole row without blocks), in the weight dtype.
2. **Search pass** (a second forward; the other quantizers now fake-quantize, the linears stay unquantized): for
   ``alpha`` in ``0, alpha_step, ..., 1`` (``torch.arange``'s float32 grid),
   ``s = clamp(act_scale^alpha / (weight_scale^(1-alpha) + tiny), 1e-4, 1e4)``, ``s /= sqrt(max(s) min(s))``; the
   loss adds ``mean((Q(W * s) applied to x / s  -  W applied to x)^2)`` per batch, ``Q`` the weight's fake quant with
   its amax taken from ``W * s`` itself (``AwqSearch``, the linear's ``linear_call`` hook).
3. The first alpha with the least loss wins; ``apply_smoothing(1 / s)``: the input is multiplied by ``1 / s``, the
   weight by ``s``, the weight amax recalibrated, a static input amax becomes ``max(amax_j / s_j)``. A linear that saw
   no token or has NaN statistics gets ``pre_quant_scale = 1`` and plain max calibration (ModelOpt's fallback).

Padding tokens count in neither mean (ModelOpt's include hf_ptq's left pads). Options: ``alpha_step`` (default 0.1;
ModelOpt's Gemma/MPT W4A8 recipes use 1), ``debug`` (ignored), and ``layerwise`` / ``moe_calib_experts_ratio``.
"""

from __future__ import annotations

import collections.abc
import functools
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.calibration.max import (
    CalibrationStats,
    calibrate_weights,
    run_calibration,
    run_forward_loop,
    set_calibration_modes,
)
from jaxquant.calibration.sites import Site
from jaxquant.calibration.smoothing import (
    SmoothingStat,
    apply_smoothing,
    arange_like_torch,
    masked_abs,
    power,
    smooth_linears,
)
from jaxquant.errors import DataError, RecipeError, UnsupportedError
from jaxquant.numerics._exact import div
from jaxquant.quantizer.sequential import SequentialConfig
from jaxquant.quantizer.tensor_quantizer import apply_pre_quant_scale, fake_quant_ste

log = logging.getLogger("jaxquant.calibration")

OPTIONS = ("alpha_step", "debug", "layerwise", "moe_calib_experts_ratio", "distributed_sync")
_TINY32 = np.finfo(np.float32).tiny


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"alpha_step": float, "layerwise": bool}`` from a recipe's ``algorithm`` mapping (without ``method``).

    Raises:
      UnsupportedError: an unknown option (named), or ``layerwise`` (not implemented for AWQ yet).
      RecipeError: ``alpha_step`` not in (0, 1].
    """
    from jaxquant.calibration.algorithms import parse_max_options, refuse_unknown

    refuse_unknown(options, OPTIONS, "awq_lite")
    step = options.get("alpha_step", 0.1)
    step = 0.1 if step is None else step
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0.0 < float(step) <= 1.0:
        raise RecipeError(f"awq_lite alpha_step must be a number in (0, 1], got {step!r}")
    shared = parse_max_options({k: v for k, v in options.items() if k not in ("alpha_step", "debug")})
    if shared["layerwise"]:
        raise UnsupportedError("awq_lite with layerwise: {enable: true} is not implemented yet; drop layerwise.")
    return {"alpha_step": float(step)}


def alpha_grid(step: float) -> tuple[float, ...]:
    """The alphas ModelOpt searches: ``torch.arange(0, 1 + step, step)`` (float32 values)."""
    return tuple(arange_like_torch(1.0 + step, step))


# ----------------------------------------------------------------------------------------------- statistics
class AwqCache(nnx.Module):
    """Pass 1 calibrator: the running sum of per-batch ``mean |x|`` per channel, the number of batches that had a
    real token, and (``channel_amax``) the per-channel ``max |x|``."""

    def __init__(self, channels: int, channel_amax: bool):
        self.act_sum = SmoothingStat(jnp.zeros((channels,), jnp.float32))
        self.steps = SmoothingStat(jnp.zeros((), jnp.float32))
        self.amax = SmoothingStat(jnp.zeros((channels,), jnp.float32)) if channel_amax else None

    def collect(self, x: jax.Array, token_mask: jax.Array | None) -> None:
        a, m = masked_abs(x, token_mask)
        a2 = a.reshape(-1, a.shape[-1])
        n = a2.shape[0] if m is None else jnp.sum(jnp.broadcast_to(m, a.shape)[..., 0])
        total = jnp.sum(a2, axis=0)
        mean = div(total, jnp.broadcast_to(jnp.maximum(n, 1).astype(jnp.float32), total.shape))
        mean = mean.astype(x.dtype).astype(jnp.float32)
        seen = jnp.asarray(n > 0)
        self.act_sum.value = self.act_sum.value + jnp.where(seen, mean, 0.0)
        self.steps.value = self.steps.value + seen.astype(jnp.float32)
        if self.amax is not None:
            self.amax.value = jnp.maximum(self.amax.value, jnp.max(a2, axis=0))


class AwqSearch(nnx.Module):
    """Pass 2 calibrator: the loss of each candidate scale (rows of ``scales``) on the linear's output."""

    def __init__(self, scales: np.ndarray):
        self.scales = SmoothingStat(jnp.asarray(scales, jnp.float32))  # [alphas, in], constant
        self.inverse = SmoothingStat(jnp.asarray(np.float32(1.0) / scales, jnp.float32))  # exact, on the host
        self.loss = SmoothingStat(jnp.zeros((scales.shape[0],), jnp.float32))
        self.steps = SmoothingStat(jnp.zeros((), jnp.float32))

    def collect(self, x, token_mask):  # pragma: no cover - the linear's hook takes the call
        return None

    def linear_call(self, linear, x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
        """The linear's unquantized output; adds each candidate's quantized-output MSE to ``loss``."""
        w = linear.weight[...]
        y = linear.matmul(x, w)
        m = None
        if token_mask is not None:
            m = token_mask.astype(bool).reshape(token_mask.shape + (1,) * (y.ndim - token_mask.ndim))
        n_tok = y.size // y.shape[-1] if m is None else jnp.sum(jnp.broadcast_to(m, y.shape[:-1] + (1,)))

        def candidate_loss(scale_and_inverse):
            s, inv = scale_and_inverse
            xs = apply_pre_quant_scale(x, inv.astype(w.dtype))
            ws = apply_pre_quant_scale(w, s.astype(w.dtype))
            out = linear.matmul(xs, search_quantize(linear.weight_quantizer, ws))
            d = (out - y).astype(jnp.float32)
            sq = d * d if m is None else jnp.where(m, d * d, 0.0)
            return jnp.sum(sq) / (jnp.maximum(n_tok, 1) * y.shape[-1])

        # one candidate at a time in a loop XLA compiles once (unrolled, the 11 candidates of every linear made the
        # compiled layer 11 times larger: 61 s of compilation on an 8B model)
        losses = jax.lax.map(candidate_loss, (self.scales.value, self.inverse.value))
        seen = jnp.asarray(n_tok > 0)
        self.loss.value = self.loss.value + jnp.where(seen, losses, 0.0)
        self.steps.value = self.steps.value + seen.astype(jnp.float32)
        return y


def search_quantize(wq, ws: jax.Array) -> jax.Array:
    """The weight fake quant AWQ's search scores a candidate with: ``wq`` with the amax of ``ws`` itself. A sequential
    weight quantizer (W4A8_AWQ: INT4 blocks then FP8) searches with its first part only, as ModelOpt's
    ``awq`` runs inside ``SequentialQuantizer.convert_to_single_quantizer`` (the FP8 part is max-calibrated after)."""
    if isinstance(wq.config, SequentialConfig):
        return fake_quant_ste(wq.config.parts[0].format, wq.block_size, ws, wq.reduce_amax(ws), None)
    return wq.quantize_with_own_amax(ws)


def weight_scale(w: jax.Array, block: int | None) -> np.ndarray:
    """ModelOpt's ``get_weight_scale``: per input column, the mean over rows of ``|W| / (block amax + tiny)`` (in the
    weight dtype, float32 result); ``block`` None: one block per row."""
    sc = _relative_magnitude(jnp.asarray(w), block or w.shape[1])
    # the mean stays a separate reduction: fused with the division above, XLA sums in another order (1-ulp changes)
    return np.asarray(jnp.mean(sc, axis=0).astype(w.dtype).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("bs",))
def _relative_magnitude(w: jax.Array, bs: int) -> jax.Array:
    """``|W| / (block amax + tiny)`` in float32 ``[out, in]``, one compiled program per weight shape (op by op, each of
    its ~20 operations was compiled for every new shape: most of awq_lite's 29 s of weight work on the 8B shape)."""
    out_dim, in_dim = w.shape
    pad = (-in_dim) % bs
    wp = jnp.pad(w, ((0, 0), (0, pad))) if pad else w
    a = jnp.abs(wp).reshape(-1, bs)
    tiny = jnp.asarray(jnp.finfo(w.dtype).tiny, w.dtype)
    sc = div(a, jnp.broadcast_to(jnp.max(a, axis=1, keepdims=True) + tiny, a.shape))
    return sc.reshape(out_dim, in_dim + pad)[:, :in_dim].astype(jnp.float32)


def candidate_scale(act: np.ndarray, wscale: np.ndarray, alpha: float) -> np.ndarray:
    """ModelOpt's ``get_scale``: ``clamp(act^alpha / (w^(1-alpha) + tiny), 1e-4, 1e4)`` normalised by
    ``sqrt(max * min)`` (float32)."""
    s = (power(act, alpha) / (power(wscale, 1.0 - alpha) + _TINY32)).astype(np.float32)
    s = np.clip(s, np.float32(1e-4), np.float32(1e4))
    return (s / np.sqrt(np.float32(s.max()) * np.float32(s.min()))).astype(np.float32)


def _block_of(wq) -> int | None:
    bs = wq.config.block_sizes
    return bs.size if bs is not None and bs.size else None


def _forward(model, sites, data, kw) -> CalibrationStats:
    if callable(data) and not hasattr(data, "__iter__"):
        return run_forward_loop(model, sites, data)
    return run_calibration(model, sites, data, forward=kw.get("forward"), progress=kw.get("progress", True),
                           total_tokens=kw.get("total_tokens"), max_seq_len=kw.get("max_seq_len"))


def multi_pass_data(algorithm: str, data, layerwise: bool, needs: str) -> list:
    """The calibration batches of an algorithm that reads them in several passes, as a list (an iterator is
    consumed once). Raises ``UnsupportedError`` for ``layerwise`` and ``DataError`` without data, naming
    ``algorithm`` and what it ``needs`` the data for."""
    if layerwise:
        raise UnsupportedError(f"{algorithm} layer by layer is not implemented yet; calibrate without --layerwise.")
    if data is None:
        raise DataError(f"{algorithm} needs calibration data ({needs}).")
    return list(data) if isinstance(data, collections.abc.Iterator) else data


def awq_lite(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None,
             layerwise: bool = False, **kw) -> CalibrationStats:
    """Run AWQ-lite on ``model`` (module doc); ``options`` from ``parse_options``; ``forward``, ``progress``,
    ``total_tokens``, ``max_seq_len`` as for ``max_calibrate``. Returns the statistics of both passes together.

    Raises:
      DataError: no calibration data.
      UnsupportedError: ``layerwise``.
    """
    opts = dict(options or parse_options({}))
    data = multi_pass_data("awq_lite", data, layerwise, "activation statistics and the alpha search")
    kw.pop("skip_forward_without_activation_calib", None)
    from jaxquant.calibration.max import default_forward

    kw["forward"] = kw.get("forward") or default_forward
    lins = smooth_linears(sites, "awq_lite")
    for lin in lins:
        if lin.iq.enabled and lin.iq.config.axis is not None:
            raise UnsupportedError(f"awq_lite: {lin.name}'s input quantizer is per-channel; AWQ needs a per-tensor "
                                   "or disabled input quantizer.")
    static_in = {lin.name: lin.iq.enabled and lin.iq.config.needs_calibration for lin in lins}
    wscale = {lin.name: weight_scale(lin.weight, _block_of(lin.wq)) for lin in lins}
    calibrate_weights(sites, model)

    # pass 1: cache
    set_calibration_modes(sites)
    for lin in lins:
        lin.iq.calibrator = AwqCache(lin.in_features, static_in[lin.name])
        lin.iq.set_mode("calibrate")
    try:
        stats = _forward(model, sites, data, kw)
        cache = {lin.name: (np.asarray(lin.iq.calibrator.act_sum.value), float(lin.iq.calibrator.steps.value),
                            None if lin.iq.calibrator.amax is None else np.asarray(lin.iq.calibrator.amax.value))
                 for lin in lins}
    finally:
        for lin in lins:
            lin.iq.calibrator = None

    # pass 2: search
    alphas = alpha_grid(opts["alpha_step"])
    act, searching = {}, []
    for lin in lins:
        total, steps, _ = cache[lin.name]
        if steps > 0:
            act[lin.name] = (total / np.float32(steps)).astype(np.float32)
            if not (np.any(np.isnan(act[lin.name])) or np.any(np.isnan(wscale[lin.name]))):
                searching.append(lin)
    for s in sites:
        s.quantizer.set_mode("fake_quant" if s.quantizer.enabled else "off")
    for lin in searching:
        table = np.stack([candidate_scale(act[lin.name], wscale[lin.name], a) for a in alphas])
        lin.iq.calibrator = AwqSearch(table)
        lin.iq.set_mode("calibrate")
    try:
        stats2 = _forward(model, sites, data, kw) if searching else CalibrationStats()
        found = {lin.name: (np.asarray(lin.iq.calibrator.loss.value), float(lin.iq.calibrator.steps.value),
                            np.asarray(lin.iq.calibrator.scales.value)) for lin in searching}
    finally:
        for lin in searching:
            lin.iq.calibrator = None

    # apply
    chosen = {}
    for lin in lins:
        ch_amax = cache[lin.name][2]
        if lin.name in found and found[lin.name][1] > 0:
            loss, _, table = found[lin.name]
            best = int(np.argmin(loss))
            chosen[lin.name] = alphas[best]
            apply_smoothing(lin, (np.float32(1.0) / table[best]).astype(np.float32), ch_amax)
            continue
        warnings.warn(f"awq_lite: Forcing pre_quant_scale=1 for {lin.name}: it saw no calibration token (or NaN "
                      "statistics); max calibration only.", stacklevel=2)
        lin.wq.set_pre_quant_scale(None)
        lin.wq.calibrate_weight(lin.weight)
        lin.iq.set_pre_quant_scale(np.ones((lin.in_features,), np.float32))
        if ch_amax is not None and lin.iq.amax is not None:
            lin.iq.amax.value = jnp.asarray(np.max(ch_amax), jnp.float32).reshape(lin.iq.amax.value.shape)
    log.info("awq_lite: %d linear(s) smoothed, alphas %s", len(chosen), sorted(set(chosen.values())))
    stats.batches += max(stats2.batches, 0)
    stats.tokens += stats2.tokens
    stats.compile_s += stats2.compile_s
    stats.run_s += stats2.run_s
    stats.awq_alphas = chosen  # type: ignore[attr-defined]
    return stats


__all__ = ["AwqCache", "AwqSearch", "OPTIONS", "alpha_grid", "awq_lite", "candidate_scale", "parse_options",
           "weight_scale"]
