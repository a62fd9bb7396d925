"""MSE calibration (ModelOpt's ``mse``, ``MseCalibConfig``): ``max`` first, then each weight's amax is searched.

ModelOpt's ``mse_calibrate`` runs ``max_calibrate`` (weights from the weights, activations from the data, MoE input
sync, fused-sibling ``global_amax`` sharing for static NVFP4) and then refines the amax of every eligible **weight**
quantizer; activation amax stays what ``max`` gave it. ``mse_calibrate`` here does the same in the same order:

1. ``max.max_calibrate`` (the forward passes are skipped when no activation quantizer needs data; the weight
   results do not depend on them);
2. ``share_global_amax``: fused siblings (q/k/v, gate/up, w1/w3) of static NVFP4 weights share one ``global_amax``
   (the max of theirs), before the search, as ModelOpt's ``SharedWeightGlobalAmaxState`` does inside
   ``max_calibrate``, so the per-block search runs against the global scale the export will use. Per-tensor weight
   amax of dynamic NVFP4 siblings is *not* unified before the search (ModelOpt searches each one's own and unifies
   at export); ``finalize`` unifies the searched values afterwards;
3. ``refine_weights``: for each eligible weight quantizer, every candidate amax's quantize-dequantize error
   ``sum (w - QDQ(w; a))^2`` is computed over the elements each amax entry governs (the whole tensor, a channel,
   a block; each stacked expert apart), and the first candidate of least error is kept (``torch.argmin``):

   * multiplier search (``fp8_scale_sweep: false``): ``a = amax_max * m`` for ``m`` in ``multipliers(settings)``
     (``linspace(start, stop, ceil((stop - start) / step) + 1)``, 39 values by default), per amax entry;
   * FP8 scale sweep (``fp8_scale_sweep: true``): only static NVFP4 weights (a format with a global amax); per
     block ``a = global_amax * c`` for the 126 finite positive E4M3 values ``c * 448`` (``fp8_scale_candidates``),
     so every block scale is an exact E4M3 code. Other weights keep their ``max`` amax, as in ModelOpt.

   Eligible: enabled weight quantizers with a calibrated amax that are neither dynamic nor MX (ModelOpt's
   ``_make_weight_mse_calibrator``) nor constant-amax.

The search is one jitted call per weight (compiled once per shape and format): the candidates are evaluated in
chunks of ``chunk`` at a time (``jax.vmap``; the chunk is sized so its temporaries stay under ``CHUNK_BYTES``) inside
a ``lax.scan`` that keeps the running least error and its candidate index, with the format's own fake quant
(``QuantizerFormat.fake_quant``) on the float32 weight, as ModelOpt quantizes ``weight.float()``. Errors are summed
onto the amax's shape by transposing the format's ``amax_per_element`` (its adjoint is exactly the sum over the
elements each amax entry covers), so no format needs a second description of its blocks.

Candidate multipliers: ModelOpt takes them from ``torch.linspace`` in float32, whose last bit depends on the device
(CUDA's kernel computes ``start + step * i`` for the first half and ``stop - step * (n - 1 - i)`` for the second,
fused multiply-adds; the CPU kernel vectorizes differently and differs in the last bit for a few values).
``multipliers`` computes the CUDA formula, each value rounded once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant.calibration.local_hessian import hessian_error
from jaxquant.calibration.sites import Site
from jaxquant.errors import RecipeError
from jaxquant.formats.registry import quantizer_format

log = logging.getLogger("jaxquant.calibration")

#: Bytes of float32 temporaries one chunk of candidates may use (about three weight-sized arrays per candidate).
CHUNK_BYTES = 1 << 30

#: MseCalibConfig's own fields (besides ``method``), with ModelOpt's defaults.
MSE_DEFAULTS = {"step_size": 0.1, "start_multiplier": 0.25, "stop_multiplier": 4.0, "fp8_scale_sweep": False}
#: Fields MseCalibConfig shares with MaxCalibConfig, parsed as ``max`` parses them.
SHARED_OPTIONS = ("distributed_sync", "shared_states", "layerwise", "moe_calib_experts_ratio")


@dataclasses.dataclass(frozen=True)
class MseSettings:
    """The search options of ``mse`` (ModelOpt's ``MseCalibConfig``; the same fields drive ``local_hessian``)."""

    step_size: float = 0.1
    start_multiplier: float = 0.25
    stop_multiplier: float = 4.0
    fp8_scale_sweep: bool = False

    @property
    def num_steps(self) -> int:
        """``ceil((stop - start) / step) + 1`` (ModelOpt's ``MseCalibrator._num_steps``)."""
        return math.ceil((self.stop_multiplier - self.start_multiplier) / self.step_size) + 1


def parse_settings(options: Mapping[str, Any], defaults: Mapping[str, Any] = MSE_DEFAULTS,
                   method: str = "mse") -> MseSettings:
    """``MseSettings`` from the ``defaults`` keys of ``options`` (other keys are ignored here).

    Raises:
      RecipeError: a multiplier or step that is not a positive number, ``fp8_scale_sweep`` not a bool, or a stop
        below the start.
    """
    kw: dict[str, Any] = {}
    for key, default in defaults.items():
        if key not in MSE_DEFAULTS:
            continue
        v = options.get(key, default)
        if v is None:
            v = default
        if key == "fp8_scale_sweep":
            if not isinstance(v, bool):
                raise RecipeError(f"algorithm.{key} ({method}) must be true or false, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise RecipeError(f"algorithm.{key} ({method}) must be a positive number, got {v!r}")
        kw[key] = v if key == "fp8_scale_sweep" else float(v)
    s = MseSettings(**kw)
    if s.stop_multiplier < s.start_multiplier:
        raise RecipeError(f"algorithm.stop_multiplier ({s.stop_multiplier}) is below algorithm.start_multiplier "
                          f"({s.start_multiplier}) ({method})")
    return s


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed ``algorithm`` options of ``mse``: ``{"settings": MseSettings, ...}`` plus what the fields shared
    with ``max`` give (``shared_patterns``, ``layerwise``).

    Raises:
      UnsupportedError: an option MseCalibConfig does not have (e.g. ``sync_expert_weight_amax``, a ``max``
        option), or one jaxquant does not implement (``moe_calib_experts_ratio``).
      RecipeError: a bad value.
    """
    from jaxquant.calibration.algorithms import parse_max_options, refuse_unknown

    refuse_unknown(options, (*MSE_DEFAULTS, *SHARED_OPTIONS), "mse")
    out = parse_max_options({k: v for k, v in options.items() if k in SHARED_OPTIONS})
    out["settings"] = parse_settings(options)
    return out


# ----------------------------------------------------------------------------------------------- candidates
def multipliers(settings: MseSettings) -> np.ndarray:
    """The float32 multipliers of the multiplier search: ``torch.linspace(start, stop, num_steps)`` as CUDA computes
    it (module doc): ``start + step * i`` below the middle, ``stop - step * (n - 1 - i)`` from it on, ``step`` the
    float32 ``(stop - start) / (n - 1)``, each value one rounding (a fused multiply-add)."""
    n = settings.num_steps
    start = np.float32(settings.start_multiplier)
    stop = np.float32(settings.stop_multiplier)
    if n == 1:
        return np.asarray([start], np.float32)
    step = np.float64((stop - start) / np.float32(n - 1))  # float32 division, held exactly in float64
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(start) + step * i  # exact product and sum in float64, then one rounding
    hi = np.float64(stop) - step * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def fp8_scale_candidates() -> np.ndarray:
    """The 126 finite positive E4M3 values divided by 448 (float32, ascending): ModelOpt's
    ``fp8_scale_candidates`` (codes 1..126; 127 is NaN)."""
    codes = np.arange(128, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return (codes[np.isfinite(codes) & (codes > 0)] / np.float32(448.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- the search
def group_sum(fmt: str, err: jax.Array, amax_shape: tuple[int, ...], block_size) -> jax.Array:
    """``err`` (a tensor's shape) summed over the elements each amax entry governs: the transpose of the format's
    ``amax_per_element`` broadcast (whole tensor, channel, block, per stacked expert)."""
    kind = quantizer_format(fmt)

    def spread(a):
        return jnp.broadcast_to(kind.amax_per_element(a, err.shape, block_size), err.shape)

    _, transpose = jax.vjp(spread, jnp.zeros(amax_shape, jnp.float32))
    return transpose(err.astype(jnp.float32))[0]


def candidate_amax(amax: jax.Array, global_amax: jax.Array | None, c: jax.Array, sweep: bool) -> jax.Array:
    """ModelOpt's ``_compute_candidate_amax``: ``amax * c`` (multiplier search) or ``ones * (global_amax * c)``
    (FP8 scale sweep); ``c`` is a scalar or amax-shaped."""
    if sweep:
        return jnp.ones_like(amax) * (global_amax * c)
    return amax * c


def chunk_for(n_elements: int, n_candidates: int, chunk_bytes: int | None = None) -> int:
    """Candidates per vectorized chunk for a weight of ``n_elements``: three float32 temporaries each, at most
    ``chunk_bytes`` (default ``CHUNK_BYTES``) in all."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return int(max(1, min(n_candidates, budget // max(1, 12 * n_elements))))


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "sweep", "chunk", "has_metric"))
def search_amax(w, amax, global_amax, cands, metric=None, *, fmt: str, block_size, sweep: bool, chunk: int,
                has_metric: bool = False):
    """The amax (amax's shape, float32) of least quantization error among ``cands`` (module doc, step 3).

    Args:
      w: the weight, ``[..., out, in]`` as its quantizer sees it (any float dtype; quantized as float32).
      amax: its ``max`` amax (the quantizer's shape); global_amax: the static-NVFP4 global amax, else None.
      cands: float32 ``[n]`` multipliers or FP8 scale candidates.
      metric: with ``has_metric``, the local Hessian ``[..., in / 16, 16, 16]`` (``local_hessian.py``): the error of a
        candidate is then ``dwᵀ H dw`` per row and block (on each of the block's elements) instead of ``dw²``.
    """
    x = jnp.asarray(w).astype(jnp.float32)
    amax = jnp.asarray(amax, jnp.float32)
    kind = quantizer_format(fmt)
    n = cands.shape[0]
    pad = -n % chunk
    c_all = jnp.concatenate([cands, jnp.broadcast_to(cands[-1:], (pad,))]) if pad else cands  # repeats never win

    def loss(c):
        xq = kind.fake_quant(x, candidate_amax(amax, global_amax, c, sweep), global_amax, block_size)
        d = x - xq
        if has_metric:
            return group_sum(fmt, hessian_error(d, metric), amax.shape, block_size)
        return group_sum(fmt, jnp.square(d), amax.shape, block_size)

    def body(carry, k):
        best, idx = carry
        cs = jax.lax.dynamic_slice_in_dim(c_all, k * chunk, chunk)
        losses = jax.vmap(loss)(cs)
        j = jnp.argmin(losses, axis=0)
        m = jnp.min(losses, axis=0)
        better = m < best  # strict: an earlier candidate of equal error stays (torch.argmin's first minimum)
        return (jnp.where(better, m, best), jnp.where(better, j + k * chunk, idx)), None

    init = (jnp.full(amax.shape, jnp.inf, jnp.float32), jnp.zeros(amax.shape, jnp.int32))
    (_, idx), _ = jax.lax.scan(body, init, jnp.arange(c_all.shape[0] // chunk))
    return candidate_amax(amax, global_amax, c_all[idx], sweep)


def eligible(site: Site, sweep: bool) -> bool:
    """Whether ``refine_weights`` searches this site's amax (module doc, step 3)."""
    q = site.quantizer
    cfg = site.config
    if site.role != "weight" or cfg is None or cfg.fixed_amax is not None or cfg.is_dynamic or q.amax is None:
        return False
    return quantizer_format(cfg.format).has_global_amax or not sweep


def search_site(site: Site, settings: MseSettings, metric=None) -> jax.Array:
    """The searched amax of one eligible weight site (on the default device; not written back)."""
    from jaxquant.calibration.stages import on_default_device

    q = site.quantizer
    sweep = settings.fp8_scale_sweep and quantizer_format(q.config.format).has_global_amax
    cands = fp8_scale_candidates() if sweep else multipliers(settings)
    gamax = q.global_amax.value if q.global_amax is not None else None
    w, amax, gamax = on_default_device([site.weight(), q.amax.value, gamax])
    chunk = chunk_for(int(np.prod(w.shape)), len(cands))
    return search_amax(w, amax, gamax, jnp.asarray(cands), metric, fmt=q.config.format, block_size=q.block_size,
                       sweep=sweep, chunk=chunk, has_metric=metric is not None)


def refine_weights(sites: list[Site], settings: MseSettings, *, metrics: Mapping[str, Any] | None = None,
                   progress: bool = False) -> int:
    """Replace the amax of every eligible weight site by its searched amax (in place). Returns how many.

    ``metrics``: ``{site path: error weighting}`` for ``local_hessian`` (sites without one use the squared error).
    """
    todo = [s for s in sites if eligible(s, settings.fp8_scale_sweep)]
    bar = None
    if progress and todo:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="weight", desc="MSE weight search", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for s in todo:
            metric = (metrics or {}).get(s.path)
            new = search_site(s, settings, metric)
            var = s.quantizer.amax
            var.value = jax.device_put(new, var.value.sharding) if isinstance(var.value, jax.Array) else new
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    log.info("mse: searched the amax of %d weight quantizer(s) in %.2f s", len(todo), time.perf_counter() - t0)
    return len(todo)


def share_global_amax(sites: list[Site], patterns=None) -> int:
    """Fused siblings of static NVFP4 weights get the max of their ``global_amax`` (module doc, step 2), by
    ``finalize``'s rules. Returns the number of groups."""
    from jaxquant.calibration.finalize import SHARED_PATTERNS, FinalizeReport, site_configs, unify_fused_siblings
    from jaxquant.calibration.state import GLOBAL_AMAX, load_calibration_state

    with_global = [s for s in sites if s.config is not None and s.quantizer.global_amax is not None]
    if not with_global:
        return 0
    state: dict[str, np.ndarray] = {}
    for s in with_global:
        g = np.asarray(s.quantizer.global_amax.value, np.float32)
        for e, name in enumerate(s.names):
            state[f"{name}.{GLOBAL_AMAX}"] = (g[e] if s.stacked else g).reshape(())
    report = FinalizeReport()
    unify_fused_siblings(state, site_configs(sites), report, patterns=SHARED_PATTERNS if patterns is None else patterns)
    load_calibration_state(None, state, strict=False, sites=with_global)
    return len(report.fused_groups)


# ----------------------------------------------------------------------------------------------- the algorithm
def mse_calibrate(model: Any, sites: list[Site], data: Any, *, settings: MseSettings = MseSettings(),
                  shared_patterns=None, progress: bool = True, **max_kw):
    """ModelOpt's ``mse_calibrate`` up to (not including) ``finalize``: ``max``, fused global-amax sharing, the
    weight search (module doc). ``max_kw``: ``max_calibrate``'s keywords. Returns max's ``CalibrationStats``."""
    from jaxquant.calibration.max import max_calibrate

    stats = max_calibrate(model, sites, data, progress=progress, **max_kw)
    t0 = time.perf_counter()
    share_global_amax(sites, shared_patterns)
    refine_weights(sites, settings, progress=progress)
    stats.search_s = time.perf_counter() - t0
    return stats


__all__ = [
    "CHUNK_BYTES",
    "MseSettings",
    "candidate_amax",
    "eligible",
    "fp8_scale_candidates",
    "group_sum",
    "mse_calibrate",
    "multipliers",
    "parse_options",
    "parse_settings",
    "refine_weights",
    "search_amax",
    "search_site",
    "share_global_amax",
]
