"""AWQ-clip (ModelOpt's ``awq_clip``, ``AWQClipCalibConfig``) and AWQ-full (``awq_full``: ``awq_lite`` then
``awq_clip``): a clipped weight amax chosen on the linears' outputs.

For every linear whose enabled weight quantizer has ``block_sizes`` (ModelOpt's selection), one calibration forward
runs with every quantizer calibrating or off and the linears unquantized (ModelOpt's stats-collection pass). In it
each such linear (``AwqClipSearch``, the linear's ``linear_call`` hook):

* max-calibrates its input quantizer afresh on the input after any pre_quant_scale (the amax an earlier
  ``awq_lite`` set is replaced by this pass's running max, as ModelOpt's ``reset_amax`` + ``max_calibrate`` do);
* for each clip ratio ``r`` in ``[round(v, 2) for v in arange(min_clip_ratio, 1, shrink_step)] + [1.0]`` adds
  ``mean((x W_r^T - x W^T)^2)`` of the batch to the loss of ``r`` (float32), where ``x`` is the (smoothed) input,
  ``W`` the weight as its quantizer sees it (smoothed by ``awq_lite``) and ``W_r`` its fake quant with the amax
  ``r * amax_max``.

The first ratio of least total loss wins; the weight amax becomes ``float32(amax_max) * float32(r)``. A linear that
saw no token keeps its max amax (ModelOpt leaves its weight quantizer disabled there).

Weights with one amax per tensor although blocked (dynamic NVFP4: ModelOpt's "only the per-tensor amax is clipped",
the ``nvfp4_awq_clip`` / ``nvfp4_awq_full`` presets) use that loss. Integer per-block weights (INT4 blocks) get
ModelOpt's per-block search instead: per batch every ``step``-th token (``step = max(1, tokens // max_tokens_per_batch)``),
and per output row and block the mean over those tokens of ``(x_blk . Q_r(W)_blk - x_blk . W_blk)^2``; each block
keeps its own best ratio. Not yet (UnsupportedError): static NVFP4 blocks (a global amax), stacked MoE experts,
``layerwise``. ``max_co_batch_size`` only splits ModelOpt's work (no effect on the result); ``debug`` is ignored.
Deviations: padding tokens count in no loss and are never sampled (ModelOpt's include them); sums run in another
order than torch's (the block partial products are accumulated in float32 and rounded once to the weight dtype),
so ratios whose losses tie to the last bits may differ.
"""

from __future__ import annotations

import collections.abc
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.calibration.sites import Site
from jaxquant.calibration.smoothing import SmoothingStat
from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer.tensor_quantizer import UNCALIBRATED, TensorQuantizer, fake_quant_ste

log = logging.getLogger("jaxquant.calibration")

CLIP_DEFAULTS = {"max_co_batch_size": 1024, "max_tokens_per_batch": 64, "min_clip_ratio": 0.5, "shrink_step": 0.05}
OPTIONS = (*CLIP_DEFAULTS, "debug", "layerwise", "moe_calib_experts_ratio")


def parse_options(options: Mapping[str, Any], method: str = "awq_clip") -> dict[str, Any]:
    """``{"ratios": (float, ...), "max_tokens_per_batch": int}`` from a recipe's ``awq_clip`` mapping.

    Raises:
      UnsupportedError: an unknown option (named), ``layerwise`` enabled, ``moe_calib_experts_ratio``.
      RecipeError: ``min_clip_ratio`` outside (0, 1), ``shrink_step`` outside (0, 1], a count not a positive int.
    """
    from jaxquant.calibration.algorithms import parse_max_options, refuse_unknown

    refuse_unknown(options, OPTIONS, method)
    v = {k: (options.get(k) if options.get(k) is not None else d) for k, d in CLIP_DEFAULTS.items()}
    for k in ("max_co_batch_size", "max_tokens_per_batch"):
        if isinstance(v[k], bool) or not isinstance(v[k], int) or v[k] <= 0:
            raise RecipeError(f"algorithm.{k} ({method}) must be a positive integer, got {v[k]!r}")
    lo, step = v["min_clip_ratio"], v["shrink_step"]
    if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not 0.0 < lo < 1.0:
        raise RecipeError(f"algorithm.min_clip_ratio ({method}) must be in (0, 1), got {lo!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
        raise RecipeError(f"algorithm.shrink_step ({method}) must be in (0, 1], got {step!r}")
    shared = parse_max_options({k: options[k] for k in ("layerwise", "moe_calib_experts_ratio") if k in options})
    if shared["layerwise"]:
        raise UnsupportedError(f"{method} with layerwise: {{enable: true}} is not implemented yet; drop layerwise.")
    return {"ratios": clip_ratios(float(lo), float(step)), "max_tokens_per_batch": v["max_tokens_per_batch"]}


def clip_ratios(min_clip_ratio: float = 0.5, shrink_step: float = 0.05) -> tuple[float, ...]:
    """ModelOpt's ratios: ``round(v, 2)`` of ``torch.arange(min, 1.0, step)`` (float32 values), then 1.0."""
    n = math.ceil((1.0 - min_clip_ratio) / shrink_step)
    return tuple(round(float(np.float32(min_clip_ratio + i * shrink_step)), 2) for i in range(n)) + (1.0,)


class AwqClipSearch(nnx.Module):
    """The calibrator of one linear's input quantizer in the clip pass: the loss of each clip ratio (one per tensor,
    or ``[ratios, *amax.shape]`` per block)."""

    def __init__(self, ratios: tuple[float, ...], w_amax: np.ndarray, max_tokens: int = 64):
        self.ratios = ratios
        self.max_tokens = max_tokens
        self.per_block = np.size(w_amax) != 1
        self.amax = SmoothingStat(jnp.asarray(w_amax, jnp.float32))  # constant: the weight's max amax
        shape = (len(ratios), *np.shape(w_amax)) if self.per_block else (len(ratios),)
        self.loss = SmoothingStat(jnp.zeros(shape, jnp.float32))
        self.tokens = SmoothingStat(jnp.zeros((), jnp.float32))

    def collect(self, x, token_mask):  # pragma: no cover - the linear's hook takes the call
        return None

    def linear_call(self, linear, x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
        """The linear's unquantized output; max-calibrates its input quantizer and adds each ratio's loss."""
        xs = linear.input_quantizer(x, token_mask=token_mask)  # calibrate mode: pre_quant_scale applied, amax
        wq = linear.weight_quantizer
        w = wq.scaled(linear.weight[...])
        if self.per_block:
            self._block_losses(wq, w, xs, token_mask)
            return linear.output_quantizer(linear.matmul(xs, w), token_mask=token_mask)
        xw = xs.astype(w.dtype)
        dims = (((xw.ndim - 1,), (1,)), ((), ()))
        ref = jax.lax.dot_general(xw, w, dims)
        m = None
        if token_mask is not None:
            m = token_mask.astype(bool).reshape(token_mask.shape + (1,) * (ref.ndim - token_mask.ndim))
        n_tok = ref.size // ref.shape[-1] if m is None else jnp.sum(jnp.broadcast_to(m, ref.shape[:-1] + (1,)))

        def ratio_loss(r):
            wr = fake_quant_ste(wq.config.format, wq.block_size, w, self.amax.value * r, None)
            d = (jax.lax.dot_general(xw, wr, dims) - ref).astype(jnp.float32)
            sq = d * d if m is None else jnp.where(m, d * d, 0.0)
            return jnp.sum(sq) / (jnp.maximum(n_tok, 1) * ref.shape[-1])

        losses = jax.lax.map(ratio_loss, self._ratio_array())  # one ratio at a time, compiled once
        seen = jnp.asarray(n_tok > 0)
        self.loss.value = self.loss.value + jnp.where(seen, losses, 0.0)
        self.tokens.value = self.tokens.value + jnp.asarray(n_tok, jnp.float32)
        y = linear.matmul(xs, w)
        return linear.output_quantizer(y, token_mask=token_mask)

    def _ratio_array(self) -> jax.Array:
        """The clip ratios as a float32 ``[n]`` array (each ``jnp.float32(r)``, as the search scales the amax)."""
        return jnp.asarray(np.asarray(self.ratios, np.float32))

    def _block_losses(self, wq, w: jax.Array, xs: jax.Array, token_mask: jax.Array | None) -> None:
        """ModelOpt's per-block search: every ``step``-th real token (``step = max(1, tokens // max_tokens)``), per
        output row and block of the weight quantizer the mean over those tokens of the squared difference of the
        block's partial dot products (``x_blk . Q_r(w)_blk`` vs ``x_blk . w_blk``)."""
        bs = wq.block_size
        co, ci = w.shape
        x2 = xs.reshape(-1, ci).astype(w.dtype)
        real = jnp.ones(x2.shape[:1], bool) if token_mask is None else token_mask.reshape(-1).astype(bool)
        rank = jnp.cumsum(real.astype(jnp.int32)) - 1
        step = jnp.maximum(1, jnp.sum(real, dtype=jnp.int32) // self.max_tokens)
        sel = real & (rank % step == 0)
        n_sel = jnp.sum(sel, dtype=jnp.int32)
        pad = -ci % bs
        xb = jnp.pad(x2, ((0, 0), (0, pad))).reshape(x2.shape[0], -1, bs)

        def partial(wt):  # [co, T, n_block]: each block's partial dot product, in the weight dtype
            wb = jnp.pad(wt, ((0, 0), (0, pad))).reshape(co, -1, bs)
            out = jnp.einsum("tnb,cnb->ctn", xb, wb, precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
            return out.astype(w.dtype)

        org = partial(w)

        def ratio_loss(r):
            wr = fake_quant_ste(wq.config.format, bs, w, self.amax.value * r, None)
            d = (partial(wr) - org).astype(jnp.float32)
            sq = jnp.where(sel[None, :, None], d * d, 0.0)
            return (jnp.sum(sq, axis=1) / jnp.maximum(n_sel, 1).astype(jnp.float32)).reshape(self.amax.value.shape)

        losses = jax.lax.map(ratio_loss, self._ratio_array())
        self.loss.value = self.loss.value + jnp.where(n_sel > 0, losses, 0.0)
        self.tokens.value = self.tokens.value + n_sel.astype(jnp.float32)


def clip_sites(sites: list[Site], method: str = "awq_clip") -> list[Site]:
    """The weight sites awq_clip searches (enabled, blocked: ModelOpt's ``block_sizes is not None``).

    Raises:
      UnsupportedError: stacked experts, a weight that is not a jaxquant ``Linear``'s, or per-block amax (module doc).
    """
    out = []
    for s in sites:
        cfg = s.config
        if not s.is_gemm_weight or cfg is None or cfg.block_sizes is None:
            continue
        if s.stacked:
            raise UnsupportedError(f"{method} on stacked MoE experts ({s.path}) is not implemented yet.")
        if not isinstance(getattr(s.parent, "input_quantizer", None), TensorQuantizer) \
                or not callable(getattr(s.parent, "matmul", None)) or s.attr != "weight_quantizer":
            raise UnsupportedError(f"{method}: {s.path} is not a jaxquant Linear's weight quantizer.")
        per_tensor = np.size(s.quantizer.amax.value) == 1 and cfg.block_sizes.type == "dynamic"
        if not per_tensor and (s.quantizer.global_amax is not None or not isinstance(cfg.num_bits, int)):
            raise UnsupportedError(f"{method}: {s.path} ({cfg.format}): the per-block clip search is implemented "
                                   "for integer blocks (INT4) and the per-tensor one for dynamic NVFP4, not this.")
        out.append(s)
    return out


def awq_clip(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None,
             layerwise: bool = False, method: str = "awq_clip", **kw):
    """Run AWQ-clip on ``model`` (module doc); ``options`` from ``parse_options``; ``forward``, ``progress``,
    ``total_tokens``, ``max_seq_len`` as for ``max_calibrate``. Returns the pass's statistics (``awq_clip_ratios``:
    the ratio chosen per linear).

    Raises:
      DataError: no calibration data.
      UnsupportedError: ``layerwise``, or a weight ``clip_sites`` refuses.
    """
    from jaxquant.calibration.awq import _forward, multi_pass_data
    from jaxquant.calibration.max import calibrate_weights, default_forward, set_calibration_modes

    opts = dict(options or parse_options({}))
    data = multi_pass_data(method, data, layerwise, "the clip search runs on the linears' outputs")
    kw.pop("skip_forward_without_activation_calib", None)
    kw.pop("on_weights_calibrated", None)
    kw["forward"] = kw.get("forward") or default_forward
    todo = clip_sites(sites, method)
    calibrate_weights(sites, model)
    set_calibration_modes(sites)
    searches = {}
    for s in todo:
        iq = s.parent.input_quantizer
        if iq.enabled and iq.config.needs_calibration:
            iq.amax.value = jnp.full(iq.amax.value.shape, UNCALIBRATED, jnp.float32)
        iq.calibrator = searches[s.path] = AwqClipSearch(opts["ratios"], np.asarray(s.quantizer.amax.value),
                                                         opts["max_tokens_per_batch"])
        iq.set_mode("calibrate")
    try:
        stats = _forward(model, sites, data, kw)
        found = {p: (np.asarray(c.loss.value), float(c.tokens.value)) for p, c in searches.items()}
    finally:
        for s in todo:
            s.parent.input_quantizer.calibrator = None
    chosen = {}
    for s in todo:
        loss, tokens = found[s.path]
        if tokens <= 0:
            log.warning("%s: %s saw no calibration token; its weight keeps the max amax.", method, s.path)
            continue
        idx = np.argmin(loss, axis=0)  # per block (or one): the first ratio of least loss
        best = np.asarray(opts["ratios"], np.float32)[idx]
        chosen[s.module_names[0]] = opts["ratios"][int(idx)] if idx.ndim == 0 else best
        a = s.quantizer.amax
        a.value = jnp.asarray(np.asarray(a.value, np.float32) * best)
    log.info("%s: clipped the weight amax of %d linear(s)", method, len(chosen))
    stats.awq_clip_ratios = chosen  # type: ignore[attr-defined]
    return stats


# ----------------------------------------------------------------------------------------------- awq_full
def parse_full_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``awq_full``'s options (AWQFullCalibConfig: awq_lite's and awq_clip's): ``{"lite": ..., "clip": ...}``."""
    from jaxquant.calibration import awq
    from jaxquant.calibration.algorithms import refuse_unknown

    refuse_unknown(options, tuple(dict.fromkeys((*awq.OPTIONS, *OPTIONS))), "awq_full")
    lite = awq.parse_options({k: v for k, v in options.items() if k in awq.OPTIONS})
    clip = parse_options({k: v for k, v in options.items() if k in OPTIONS}, "awq_full")
    return {"lite": lite, "clip": clip}


def awq_full(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None, **kw):
    """``awq_lite`` then ``awq_clip`` on the smoothed weights (ModelOpt's ``awq(..., "awq_full")``). Returns the
    statistics of all three passes."""
    from jaxquant.calibration.awq import awq_lite

    opts = dict(options or parse_full_options({}))
    if isinstance(data, collections.abc.Iterator):
        data = list(data)  # three passes
    stats = awq_lite(model, sites, data, options=opts["lite"], **kw)
    stats2 = awq_clip(model, sites, data, options=opts["clip"], method="awq_full", **kw)
    for k in ("batches", "tokens", "compile_s", "run_s"):
        setattr(stats, k, getattr(stats, k) + getattr(stats2, k))
    stats.awq_clip_ratios = stats2.awq_clip_ratios  # type: ignore[attr-defined]
    return stats


__all__ = ["AwqClipSearch", "CLIP_DEFAULTS", "OPTIONS", "awq_clip", "awq_full", "clip_ratios", "clip_sites",
           "parse_full_options", "parse_options"]
