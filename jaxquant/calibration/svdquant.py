"""SVDQuant (ModelOpt's ``svdquant``, ``SVDQuantConfig``): AWQ-lite smoothing, then a low-rank branch that takes the
largest singular directions of each smoothed weight out of quantization.

For every linear with an enabled weight quantizer (``smoothing.smooth_linears``) whose ModelOpt module name matches
none of ``skip_layers``:

1. ``awq_lite`` (``awq.py``, default options) smooths it: input ``pre_quant_scale = p``, weight ``W_s =
   round_dtype(W / p)``. Linears named by ``skip_layers`` take no part (their quantizers are off during AWQ's passes,
   as ModelOpt disables them) and get neither smoothing nor a branch.
2. ``W_s = U S V^T`` in float64 (``numpy.linalg.svd``, thin); ``lora_b = U[:, :r] S[:r]`` ``[out, r]`` and
   ``lora_a = V^T[:r]`` ``[r, in]``, each rounded to the model dtype (through float32, as torch's ``.to`` of a
   float64 tensor does); with fewer than ``r = lowrank`` singular values the factors are zero-padded to ``r`` (ModelOpt
   warns). They become the weight quantizer's ``svdquant_lora_a`` / ``svdquant_lora_b`` (``quantizer/lowrank.py``):
   the quantizer now sees ``round_dtype(W_s - round_dtype(lora_b @ lora_a))`` and the linear adds
   ``(x_s @ lora_a^T) @ lora_b^T``. The weight and input amax of these linears are reset.
3. ``max`` calibration of the whole model (weights from the residuals, activations with the branch in place).

Options: ``lowrank`` (default 32), ``skip_layers`` (fnmatch patterns over ModelOpt module names), and
``layerwise`` / ``moe_calib_experts_ratio`` (refused when set, as for ``awq_lite``). Deviation: ModelOpt computes
``lora_b @ lora_a`` as a model-dtype GEMM (its BLAS's summation order); jaxquant sums in float32 at full precision
and rounds once, so a residual element may differ by one rounding where the float32 sums straddle a rounding
boundary. Stacked MoE experts (as by ``awq_lite``) and sequential weight quantizers (ModelOpt's ``SVDQuantLinear``
adds no branch to those) are refused.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant.calibration.sites import Site
from jaxquant.calibration.smoothing import smooth_linears
from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer.sequential import SequentialConfig
from jaxquant.quantizer.tensor_quantizer import UNCALIBRATED

log = logging.getLogger("jaxquant.calibration")

DEFAULT_LOWRANK = 32
OPTIONS = ("lowrank", "skip_layers", "layerwise", "moe_calib_experts_ratio")


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"lowrank": int, "skip_layers": tuple[str, ...]}`` from a recipe's ``svdquant`` mapping (without
    ``method``).

    Raises:
      UnsupportedError: an unknown option (named), ``layerwise`` enabled, ``moe_calib_experts_ratio`` set.
      RecipeError: ``lowrank`` not a positive integer, ``skip_layers`` not a list of strings.
    """
    from jaxquant.calibration.algorithms import parse_max_options, refuse_unknown

    refuse_unknown(options, OPTIONS, "svdquant")
    rank = options.get("lowrank", DEFAULT_LOWRANK)
    rank = DEFAULT_LOWRANK if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RecipeError(f"algorithm.lowrank (svdquant) must be a positive integer, got {rank!r}")
    skip = options.get("skip_layers") or ()
    if isinstance(skip, str) or not all(isinstance(p, str) for p in skip):
        raise RecipeError(f"algorithm.skip_layers (svdquant) must be a list of module-name patterns, got {skip!r}")
    shared = parse_max_options({k: options[k] for k in ("layerwise", "moe_calib_experts_ratio") if k in options})
    if shared["layerwise"]:
        raise UnsupportedError("svdquant with layerwise: {enable: true} is not implemented yet; drop layerwise.")
    return {"lowrank": rank, "skip_layers": tuple(skip)}


def svd_factors(weight, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """ModelOpt's ``svd(weight, rank)``: ``(lora_a [r, in], lora_b [out, r])`` of the thin float64 SVD of ``weight``
    (``lora_b = U_r S_r``, ``lora_a = V_r^T``), rounded to ``weight``'s dtype through float32 and returned as float32
    arrays; zero-padded to ``rank`` (with a warning) when ``min(out, in) < rank``."""
    w = np.asarray(jnp.asarray(weight).astype(jnp.float32), np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    us, vt = u[:, :rank] * s[:rank], vt[:rank]
    if us.shape[1] < rank:
        warnings.warn(f"svdquant: lowrank {rank} exceeds the weight's rank bound {us.shape[1]} "
                      f"(shape {list(w.shape)}); the factors are zero-padded.", stacklevel=2)
        us = np.pad(us, ((0, 0), (0, rank - us.shape[1])))
        vt = np.pad(vt, ((0, rank - vt.shape[0]), (0, 0)))
    dtype = jnp.asarray(weight).dtype

    def to_dtype(x):
        return np.asarray(jnp.asarray(x.astype(np.float32)).astype(dtype).astype(jnp.float32))

    return to_dtype(vt), to_dtype(us)


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def svdquant(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None,
             layerwise: bool = False, **kw):
    """Run SVDQuant on ``model`` (module doc); ``options`` from ``parse_options``; ``forward``, ``progress``,
    ``total_tokens``, ``max_seq_len``, ``mesh`` as for ``max_calibrate``. Returns the statistics of all passes
    (``awq_alphas`` from AWQ, ``svdquant_rank``: the rank per linear).

    Raises:
      DataError: no calibration data.
      UnsupportedError: ``layerwise``, stacked MoE experts, a weight that is not a jaxquant ``Linear``'s.
    """
    from jaxquant.calibration import awq
    from jaxquant.calibration.max import default_forward, max_calibrate

    opts = dict(options or parse_options({}))
    data = awq.multi_pass_data("svdquant", data, layerwise, "awq_lite's statistics and the final max calibration")
    for k in ("skip_forward_without_activation_calib", "on_weights_calibrated", "layerwise_checkpoint_dir",
              "layerwise_save_every"):
        kw.pop(k, None)
    kw["forward"] = kw.get("forward") or default_forward
    skip = opts["skip_layers"]
    skipped = {s.module_names[0] for s in sites if s.role == "weight" and s.quantizer.enabled
               and _skipped(s.module_names[0], skip)}
    lins = [lin for lin in smooth_linears(sites, "svdquant") if lin.name not in skipped]
    for lin in lins:
        if isinstance(lin.wq.config, SequentialConfig):  # ModelOpt's SVDQuantLinear adds no branch there
            raise UnsupportedError(f"svdquant: {lin.name}'s weight quantizer is sequential ({lin.wq.config.format}); "
                                   "SVDQuant needs a single weight quantizer (NVFP4).")
    awq_sites = []
    for s in sites:
        if s.module_names[0] in skipped:
            s.quantizer.set_mode("off")  # ModelOpt disables a skipped linear's quantizers during AWQ
        else:
            awq_sites.append(s)
    if skipped:
        log.info("svdquant: %d linear(s) skipped (max calibration only): %s", len(skipped), sorted(skipped))
    mesh = kw.pop("mesh", None)
    stats = awq.awq_lite(model, awq_sites, data, options=awq.parse_options({}), **kw)
    ranks = {}
    for lin in lins:
        a, b = svd_factors(lin.wq.scaled(lin.weight), opts["lowrank"])
        lin.wq.set_lowrank(a, b)
        ranks[lin.name] = opts["lowrank"]
        for q in (lin.wq, lin.iq):  # ModelOpt's reset_amax: both are calibrated afresh below
            if q.enabled and q.amax is not None and q.config.fixed_amax is None:
                q.amax.value = jnp.full(q.amax.value.shape, UNCALIBRATED, jnp.float32)
    log.info("svdquant: rank-%d branch on %d linear(s)", opts["lowrank"], len(ranks))
    stats2 = max_calibrate(model, sites, data, forward=kw["forward"], progress=kw.get("progress", True),
                           total_tokens=kw.get("total_tokens"), max_seq_len=kw.get("max_seq_len"),
                           skip_forward_without_activation_calib=False, mesh=mesh)
    for k in ("batches", "tokens", "compile_s", "run_s"):
        setattr(stats, k, getattr(stats, k) + getattr(stats2, k))
    stats.svdquant_rank = ranks  # type: ignore[attr-defined]
    return stats


__all__ = ["DEFAULT_LOWRANK", "OPTIONS", "parse_options", "svd_factors", "svdquant"]
