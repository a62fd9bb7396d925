"""NVFP4 activation headroom (ModelOpt's ``nvfp4_act_headroom``, ``NVFP4ActHeadroomCalibConfig``): the global amax of
every NVFP4 dynamic-block **input** quantizer from the distribution of its per-block amax instead of their max.

``amax = max(rho * P_anchor, P_upper)``, ``P_p`` the ``p``-th percentile of the per-block amax seen in calibration
(defaults: anchor 1 %, upper 99.99 %, rho 16384 < 28672, the E4M3 normal range), so the calibrated blocks sit in the
low part of the FP8 block-scale range and larger activations than any seen still get a scale. Weights (and every
other quantizer) are calibrated by ``weight_scale_algorithm`` (``max``, the default, ``mse`` or ``local_hessian``,
with its own options); its ``max`` pass is where the histograms are collected, and the headroom amax replaces the
plain max right after it (``max.load_calibrator_amax``), before any later pass of that algorithm, as in ModelOpt.

The statistic (``HeadroomHistogram``, ModelOpt's ``NVFP4ActHeadroomCalibrator``): per batch, the amax of every block
of ``block_size`` along the last axis (a ragged tail zero-padded); every nonzero one counts in one of 512 bins of
``log2`` over ``[-40, 40)`` (``floor((log2 a + 40) / 80 * 512)`` in float32, clamped). The percentile is the centre
``2^(-40 + (i + 0.5) * 80 / 512)`` of the first bin whose cumulative count reaches ``p / 100 * total`` (float32,
``searchsorted`` left); the anchor ignores bins below ``upper / 1e6``. ``upper_percentile: 100`` uses the literal
maximum. A histogram that stays empty, or percentiles that collapse, fall back to the plain max (ModelOpt's too).

Sites: enabled, data-calibrated input quantizers with NVFP4 dynamic blocks (E2M1 values, E4M3 scales). Deviations:
padding tokens count nowhere (jaxquant's statistics never see pads; ModelOpt's hook counts them); stacked MoE
experts are refused (not implemented); counts are int32 (at most 2^31 - 1 blocks per quantizer). The bin of a block
amax lying within an ulp of a bin edge can differ from ModelOpt's where the device's ``log2`` rounds differently
(torch CPU and CUDA differ there too).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.calibration.sites import Site
from jaxquant.calibration.smoothing import SmoothingStat
from jaxquant.errors import RecipeError, UnsupportedError

log = logging.getLogger("jaxquant.calibration")

OPTIONS = ("anchor_percentile", "upper_percentile", "rho", "weight_scale_algorithm", "layerwise",
           "moe_calib_experts_ratio")
#: The algorithms ``weight_scale_algorithm`` may name (ModelOpt's ``_ScaleCalibConfig``).
WEIGHT_ALGORITHMS = ("max", "mse", "local_hessian")
FP8_NORMAL_DYNAMIC_RANGE = 28672.0  # 448 / 2^-6
ANCHOR_FLOOR_RATIO = 1e6
NUM_BINS = 512
LOG2_MIN, LOG2_MAX = -40.0, 40.0
_E2M1, _E4M3 = (2, 1), (4, 3)


@dataclasses.dataclass(frozen=True)
class HeadroomSettings:
    """The percentiles (in (0, 100]) and the headroom factor rho (in (0, 28672))."""

    anchor_percentile: float = 1.0
    upper_percentile: float = 99.99
    rho: float = 16384.0


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed options: ``{"headroom": HeadroomSettings, "weight_algorithm": name, "weight_options": parsed}``
    plus the weight algorithm's parsed options at the top level (``finalize`` reads ``shared_patterns``,
    ``sync_expert_weight_amax`` there) and this algorithm's own ``layerwise``.

    Raises:
      UnsupportedError: an unknown option (named); ``layerwise`` / ``moe_calib_experts_ratio`` inside
        ``weight_scale_algorithm`` (ModelOpt passes them on to a function that does not take them).
      RecipeError: a percentile outside (0, 100], rho outside (0, 28672), a weight algorithm other than
        max / mse / local_hessian.
    """
    from jaxquant.calibration.algorithms import get_algorithm, parse_algorithm, parse_max_options, refuse_unknown

    refuse_unknown(options, OPTIONS, "nvfp4_act_headroom")
    kw = {}
    for key, lo, hi_incl, hi in (("anchor_percentile", 0.0, True, 100.0), ("upper_percentile", 0.0, True, 100.0),
                                 ("rho", 0.0, False, FP8_NORMAL_DYNAMIC_RANGE)):
        if key not in options or options[key] is None:
            continue
        v = options[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo < float(v) and (
            float(v) <= hi if hi_incl else float(v) < hi)
        if not ok:
            raise RecipeError(f"algorithm.{key} (nvfp4_act_headroom) must be in (0, {hi:g}{']' if hi_incl else ')'}, "
                              f"got {v!r}")
        kw[key] = float(v)
    method, wopts = parse_algorithm(options.get("weight_scale_algorithm") or {"method": "max"})
    if method not in WEIGHT_ALGORITHMS:
        raise RecipeError(f"algorithm.weight_scale_algorithm.method (nvfp4_act_headroom) must be one of "
                          f"{', '.join(WEIGHT_ALGORITHMS)}, got {method!r}")
    for k in ("layerwise", "moe_calib_experts_ratio"):
        if k in wopts:
            raise UnsupportedError(f"algorithm.weight_scale_algorithm.{k} (nvfp4_act_headroom): set it on "
                                   "nvfp4_act_headroom itself, not on its weight algorithm.")
    weight = get_algorithm(method).parse(wopts)
    top = parse_max_options({k: options[k] for k in ("layerwise", "moe_calib_experts_ratio") if k in options})
    out = dict(weight)
    out.update({k: top[k] for k in ("layerwise", "layerwise_checkpoint_dir", "layerwise_save_every")})
    out.update(headroom=HeadroomSettings(**kw), weight_algorithm=method, weight_options=weight)
    return out


# ----------------------------------------------------------------------------------------------- the statistic
def bin_index(log2_vals: jax.Array) -> jax.Array:
    """ModelOpt's ``_bin_index`` in float32: ``clamp(floor((l + 40) / 80 * 512), 0, 511)`` (int32)."""
    f32 = jnp.float32
    frac = (log2_vals.astype(f32) - f32(LOG2_MIN)) / f32(LOG2_MAX - LOG2_MIN)
    return jnp.clip(jnp.floor(frac * f32(NUM_BINS)).astype(jnp.int32), 0, NUM_BINS - 1)


def block_amax_histogram(x: jax.Array, block_size: int, token_mask: jax.Array | None = None) -> jax.Array:
    """The int32 ``[512]`` histogram of the nonzero per-block amax of ``x [..., K]`` (blocks along the last axis,
    a ragged tail zero-padded; masked tokens count nowhere)."""
    from jaxquant.quantizer.tensor_quantizer import masked_abs

    a = masked_abs(x, token_mask)  # the rounded values the next op sees, as TensorQuantizer.reduce_amax reads them
    pad = -a.shape[-1] % block_size
    if pad:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    bmax = jnp.max(a.reshape(-1, block_size), axis=-1)
    nz = bmax > 0
    idx = bin_index(jnp.log2(jnp.where(nz, bmax, 1.0)))
    return jnp.zeros((NUM_BINS,), jnp.int32).at[idx].add(nz.astype(jnp.int32))


class HeadroomHistogram(nnx.Module):
    """The calibrator of one NVFP4 input quantizer: the running histogram of its per-block amax."""

    def __init__(self, block_size: int, settings: HeadroomSettings):
        self.block_size = block_size
        self.settings = settings
        self.hist = SmoothingStat(jnp.zeros((NUM_BINS,), jnp.int32))

    def collect(self, x: jax.Array, token_mask: jax.Array | None) -> None:
        self.hist.value = self.hist.value + block_amax_histogram(x, self.block_size, token_mask)

    def load_amax(self, quantizer) -> None:
        """Replace the quantizer's max-calibrated amax by the headroom amax (kept where that is None); called by
        ``max.max_calibrate`` after its forward pass."""
        running_max = np.float32(np.asarray(quantizer.amax.value).max())
        amax = headroom_amax(np.asarray(self.hist.value), running_max, self.settings)
        if amax is not None:
            quantizer.amax.value = jnp.full(quantizer.amax.value.shape, amax, jnp.float32)


def _bin_index_host(value: float) -> int:
    """``_bin_index(log2(float32(value)))`` for one positive value (ModelOpt builds a float32 tensor of it)."""
    return int(bin_index(jnp.log2(jnp.float32(value))))


def percentile(hist: np.ndarray, p: float, floor_value: float | None = None) -> float | None:
    """ModelOpt's ``_percentile``: the bin centre (a Python float) where the float32 cumulative count first reaches
    ``float32(p / 100) * total``, ignoring bins below ``floor_value``; None for an empty histogram."""
    counts = np.asarray(hist).astype(np.float32)
    if floor_value is not None and floor_value > 0:
        counts[:_bin_index_host(floor_value)] = 0
    total = np.float32(counts.sum(dtype=np.float32))
    if total <= 0:
        return None
    target = np.float32(np.float32(p / 100.0) * total)
    cdf = np.cumsum(counts, dtype=np.float32)
    i = int(np.clip(np.searchsorted(cdf, target, side="left"), 0, NUM_BINS - 1))
    return float(2.0 ** (LOG2_MIN + (i + 0.5) / NUM_BINS * (LOG2_MAX - LOG2_MIN)))


def headroom_amax(hist: np.ndarray, running_max: float, s: HeadroomSettings) -> np.float32 | None:
    """ModelOpt's ``compute_amax``: ``max(rho * anchor, upper)`` as float32 (warning when rho gives no headroom);
    the running max when the percentiles collapse; None when no nonzero block was seen."""
    if not np.any(np.asarray(hist) > 0):
        return None
    upper = float(running_max) if s.upper_percentile >= 100.0 else percentile(hist, s.upper_percentile)
    anchor = percentile(hist, s.anchor_percentile, upper / ANCHOR_FLOOR_RATIO) if upper else None
    if not upper or upper <= 0 or not anchor or anchor <= 0:
        return np.float32(running_max)
    head = s.rho * anchor
    if head <= upper:
        span = upper / anchor
        warnings.warn(f"nvfp4_act_headroom: per-block amax range {span:.1f} leaves no headroom at rho={s.rho:g}; "
                      "the scale falls back to the top of the calibrated range"
                      + (f" (the range exceeds the FP8 scale range {FP8_NORMAL_DYNAMIC_RANGE:.0f}: reduce it, "
                         "e.g. with SmoothQuant)." if span > FP8_NORMAL_DYNAMIC_RANGE
                         else "; lower anchor_percentile or raise rho."), stacklevel=3)
        return np.float32(upper)
    return np.float32(head)


# ----------------------------------------------------------------------------------------------- the algorithm
def headroom_site(s: Site) -> bool:
    """An enabled, data-calibrated input quantizer with NVFP4 dynamic blocks (E2M1 values, E4M3 scales)."""
    cfg = s.config
    bs = cfg.block_sizes if cfg is not None else None
    return (s.role == "input" and cfg is not None and cfg.needs_calibration and bs is not None
            and bs.type == "dynamic" and cfg.num_bits == _E2M1 and bs.scale_bits == _E4M3)


def nvfp4_act_headroom(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None,
                       **kw):
    """Run ``weight_scale_algorithm`` with a ``HeadroomHistogram`` on every NVFP4 input quantizer (module doc);
    ``options`` from ``parse_options``, the other keywords ``quantize`` passes to an algorithm. Returns the weight
    algorithm's statistics.

    Raises:
      UnsupportedError: a stacked MoE input quantizer among the targets.
    """
    from jaxquant.calibration.algorithms import get_algorithm

    opts = dict(options or parse_options({}))
    targets = [s for s in sites if headroom_site(s)]
    for s in targets:
        if s.stacked:
            raise UnsupportedError(f"nvfp4_act_headroom on stacked MoE experts ({s.path}) is not implemented yet.")
    if not targets:
        warnings.warn("nvfp4_act_headroom: no NVFP4 dynamic-block input quantizer matched, so this is plain max "
                      "calibration of the activations.", stacklevel=2)
    settings = opts["headroom"]
    saved = [(s.quantizer, s.quantizer.calibrator) for s in targets]
    for s in targets:
        bs = s.config.block_sizes.size or 16
        s.quantizer.calibrator = HeadroomHistogram(bs, settings)
    algo = get_algorithm(opts["weight_algorithm"])
    wopts = opts["weight_options"]
    run_kw = {k: wopts[k] for k in algo.run_options if k in wopts}
    if "options" in algo.run_options:
        run_kw["options"] = wopts
    kw.pop("on_weights_calibrated", None)
    try:
        stats = algo.run(model, sites, data, **kw, **run_kw)
    finally:
        for q, c in saved:
            q.calibrator = c
    log.info("nvfp4_act_headroom: %d NVFP4 input quantizer(s), weights by %s", len(targets), algo.name)
    return stats


__all__ = ["HeadroomHistogram", "HeadroomSettings", "OPTIONS", "WEIGHT_ALGORITHMS", "bin_index",
           "block_amax_histogram", "headroom_amax", "headroom_site", "nvfp4_act_headroom", "parse_options",
           "percentile"]
