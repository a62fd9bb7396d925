"""GPTQ (ModelOpt's ``gptq``, ``GPTQCalibConfig``): weights rewritten column by column so that the rounding error of
each quantized column is compensated by the columns not yet quantized, weighted by the inverse input Hessian.

Per decoder layer (``layerwise: {enable: true}``, ModelOpt's recipe ``nvfp4_default-kv_none-gptq``) or once over the
whole model (``layerwise`` off), as ModelOpt's ``gptq`` does it:

1. ``max`` calibration (weights from the weights, activations from the layer's inputs); static NVFP4 weights get
   their global amax, shared by fused siblings (q/k/v, gate/up) as ModelOpt's promotion does (``mse.share_global_amax``).
2. Hessian pass: the same inputs again with every weight quantizer off and the other quantizers fake-quantizing;
   each GPTQ linear accumulates ``H = (2 / n) sum_tokens x^T x`` (float32 ``[in, in]``) of its input *after* the input
   quantizer (``HessianStat``, ModelOpt's incremental ``update_hessian``; padding tokens count in neither ``H`` nor
   ``n``: jaxquant's calibration never lets pads count).
3. Per linear: ``hessian_inverse`` (dead columns, all-zero in ``W``, get ``H`` rows/columns 0 and diagonal 1; damping
   ``perc_damp * mean(diag H)``; Cholesky, inverse, upper Cholesky factor ``U`` of the inverse; identity when ``H``
   is not positive definite) and ``blockwise_update`` (module function doc). The updated weight replaces the linear's
   weight in place (rounded to the model dtype); the weight amax stays the ``max`` amax of the source weight, as in
   ModelOpt (``export`` writes the scales from it).
4. Layerwise: the next layer's inputs are this layer's outputs with every quantizer on and the updated weights
   (``layerwise.get_qdq_activations_from_prev_layer``, true by default for GPTQ as in ModelOpt; false: the
   unquantized outputs of step 1). The head's quantizers see the last layer's outputs the same way.

Supported weight quantizers: static amax whose fake quant of an element depends only on its own amax entry (and the
global amax): ``nvfp4_static``, ``fp8`` / ``fp8_per_channel``, ``int8`` / ``int8_per_channel``, ``int4_block*``.
Dynamic blocks (``nvfp4`` dynamic weights, MX), 2-D blocks and stacked MoE experts are refused
(``UnsupportedError``). A weight smoothed by an earlier step of an algorithm list (``smoothquant``, ``awq_lite``) is
folded first (``W * (1 / pre_quant_scale)``, ModelOpt's default), and GPTQ updates the folded weight. Options: ``perc_damp`` (0.01), ``block_size`` (128), ``fused`` (accepted: ModelOpt's
fused Triton kernel computes the same update; jaxquant's update is one jitted call either way), ``layerwise``;
``moe_calib_experts_ratio`` as ``max`` parses it.
"""

from __future__ import annotations

import collections.abc
import functools
import logging
import math
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.calibration.sites import Site
from jaxquant.calibration.smoothing import SmoothingStat
from jaxquant.errors import DataError, NonFiniteError, RecipeError, UnsupportedError
from jaxquant.formats.registry import quantizer_format
from jaxquant.models.walk import iter_modules
from jaxquant.quantizer.tensor_quantizer import TensorQuantizer, _mask_like, apply_pre_quant_scale

log = logging.getLogger("jaxquant.calibration")

#: GPTQCalibConfig's fields besides ``method``, with ModelOpt's defaults (``layerwise`` / ``moe_calib_experts_ratio``:
#: the fields every algorithm has).
DEFAULTS = {"perc_damp": 0.01, "block_size": 128, "fused": False}
OPTIONS = (*DEFAULTS, "layerwise", "moe_calib_experts_ratio")
_HI = jax.lax.Precision.HIGHEST


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"perc_damp", "block_size", "fused", "layerwise", "layerwise_checkpoint_dir", "layerwise_save_every",
    "layerwise_qdq"}`` from a recipe's ``algorithm`` mapping (without ``method``); None means the default.

    Raises:
      UnsupportedError: an unknown option, ``calib_mutates_weights: false`` (GPTQ rewrites weights).
      RecipeError: ``perc_damp`` not in (0, 1], ``block_size`` not a positive integer, ``fused`` not a bool.
    """
    from jaxquant.calibration.algorithms import parse_max_options, refuse_unknown

    refuse_unknown(options, OPTIONS, "gptq")
    out = {k: (DEFAULTS[k] if options.get(k) is None else options[k]) for k in DEFAULTS}
    pd, bs = out["perc_damp"], out["block_size"]
    if isinstance(pd, bool) or not isinstance(pd, (int, float)) or not 0.0 < float(pd) <= 1.0:
        raise RecipeError(f"gptq perc_damp must be a number in (0, 1], got {pd!r}")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise RecipeError(f"gptq block_size must be a positive integer, got {bs!r}")
    if not isinstance(out["fused"], bool):
        raise RecipeError(f"gptq fused must be true or false, got {out['fused']!r}")
    lw = options.get("layerwise")
    if isinstance(lw, Mapping) and lw.get("calib_mutates_weights") is False:
        raise UnsupportedError("gptq rewrites the layer weights; layerwise.calib_mutates_weights: false would lose "
                               "them (ModelOpt refuses it too). Drop that key.")
    out["perc_damp"] = float(pd)
    out.update(parse_max_options({k: v for k, v in options.items() if k not in DEFAULTS}, qdq_default=True))
    return out


# ----------------------------------------------------------------------------------------------- the numerics
def hessian_update(h: jax.Array, n: jax.Array, x: jax.Array, token_mask: jax.Array | None):
    """ModelOpt's ``update_hessian`` on one batch: ``H <- H * n / (n + b) + (sqrt(2 / (n + b)) X)^T (sqrt(2 / (n + b)) X)``
    with ``X`` the batch's ``b`` real tokens ``[b, in]`` in float32; ``h [in, in]``, ``n`` a float32 count.
    Returns ``(h, n)``; unchanged when the batch has no real token."""
    k = x.shape[-1]
    xs = x.astype(jnp.float32)
    m = _mask_like(token_mask, xs)
    if m is not None:
        xs = jnp.where(m, xs, 0.0)
        b = jnp.sum(jnp.broadcast_to(m, xs.shape[:-1] + (1,)), dtype=jnp.float32)
    else:
        b = jnp.asarray(math.prod(xs.shape[:-1]), jnp.float32)
    xs = xs.reshape(-1, k)
    n_new = n + b
    safe = jnp.maximum(n_new, 1.0)
    scaled = jnp.sqrt(2.0 / safe) * xs
    new = h * (n / safe) + jnp.dot(scaled.T, scaled, precision=_HI)
    return jnp.where(b > 0, new, h), n_new


@functools.partial(jax.jit, static_argnames=())
def hessian_inverse(h: jax.Array, w: jax.Array, perc_damp) -> tuple[jax.Array, jax.Array]:
    """ModelOpt's ``compute_hessian_inverse``: ``(U [in, in] float32 upper triangular with U^T U = (H + damp I)^-1,
    ok)`` for ``h [in, in]`` and the weight ``w [out, in]`` (dead columns and damping: module doc). ``ok`` False:
    ``H`` was not positive definite and ``U`` is the identity (ModelOpt's fallback)."""
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    dead = jnp.all(w == 0, axis=0)
    h = jnp.where(dead[:, None] | dead[None, :], 0.0, h.astype(jnp.float32)) + jnp.diag(dead.astype(jnp.float32))
    h = h + eye * (jnp.float32(perc_damp) * jnp.mean(jnp.diag(h)))
    low = jnp.linalg.cholesky(h)
    low_inv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)
    inv = jnp.dot(low_inv.T, low_inv, precision=_HI)
    u = jnp.linalg.cholesky(inv).T
    ok = jnp.all(jnp.isfinite(u))
    return jnp.where(ok, u, eye), ok


def _column_quantizer(fmt: str, block_size, slab: int, slab_amax_shape: tuple[int, ...]):
    """``quant(col [out], amax [out], global_amax) -> [out]``: the fake quant of one weight column whose elements'
    amax (``amax_per_element``) is ``amax``. The column is repeated over ``slab`` columns (one quantization block) so
    the format quantizes it with its own block layout; with a static amax the result is the column of a whole-matrix
    fake quant, bit for bit."""
    kind = quantizer_format(fmt)

    def quant(col, amax_col, global_amax):
        out = col.shape[0]
        x = jnp.broadcast_to(col[:, None], (out, slab))
        a = kind.reduce_amax(jnp.broadcast_to(amax_col[:, None], (out, slab)), slab_amax_shape, None, block_size)
        return kind.fake_quant(x, a, global_amax, block_size)[:, 0]

    return quant


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "slab", "slab_amax_shape", "gptq_block"))
def blockwise_update(w: jax.Array, u: jax.Array, amax_el: jax.Array, global_amax: jax.Array | None, *, fmt: str,
                     block_size, slab: int, slab_amax_shape: tuple[int, ...], gptq_block: int = 128) -> jax.Array:
    """ModelOpt's ``gptq_blockwise_update``: the GPTQ-quantized weight (float32 ``[out, in]``, every column on the
    quantization grid).

    For each block of ``gptq_block`` columns ``[s, e)``, in order: for column ``j`` of it, ``q = Q(w_j)``,
    ``err = (w_j - q) / U[j, j]``, the block's later columns ``w_c -= err * U[j, c]``; after the block,
    ``w[:, e:] -= errs @ U[s:e, e:]``. ``Q`` is the weight quantizer's fake quant with its static amax
    (``amax_el``: the amax of each element, ``[out, in]``) and ``global_amax``.

    Args:
      w: float32 ``[out, in]``; u: ``hessian_inverse``'s factor ``[in, in]``.
      fmt, block_size: the weight quantizer's format and block size; slab / slab_amax_shape: see
        ``_column_quantizer``.
    """
    out, k = w.shape
    quant = _column_quantizer(fmt, block_size, slab, slab_amax_shape)
    cols = jnp.arange(k)

    def run_block(w, start, nb: int):
        ub = jax.lax.dynamic_slice(u, (start, start), (nb, nb))
        wb = jax.lax.dynamic_slice(w, (0, start), (out, nb))
        ab = jax.lax.dynamic_slice(amax_el, (0, start), (out, nb))

        def column(i, carry):
            wb, qb, errs = carry
            c = jax.lax.dynamic_index_in_dim(wb, i, axis=1, keepdims=False)
            q = quant(c, jax.lax.dynamic_index_in_dim(ab, i, axis=1, keepdims=False), global_amax)
            err = (c - q) / ub[i, i]
            row = jax.lax.dynamic_index_in_dim(ub, i, axis=0, keepdims=False)
            wb = wb - err[:, None] * row[None, :]  # U is upper triangular: columns before i are untouched
            return wb, qb.at[:, i].set(q), errs.at[:, i].set(err)

        zeros = jnp.zeros((out, nb), jnp.float32)
        _, qb, errs = jax.lax.fori_loop(0, nb, column, (wb, zeros, zeros))
        w = jax.lax.dynamic_update_slice(w, qb, (0, start))
        rows = jax.lax.dynamic_slice(u, (start, 0), (nb, k))
        later = cols >= start + nb
        return w - jnp.where(later[None, :], jnp.dot(errs, jnp.where(later[None, :], rows, 0.0), precision=_HI), 0.0)

    w = w.astype(jnp.float32)
    full = k // gptq_block
    if full:
        w = jax.lax.fori_loop(0, full, lambda b, w: run_block(w, b * gptq_block, gptq_block), w)
    if k % gptq_block:
        w = run_block(w, full * gptq_block, k % gptq_block)
    return w


# ----------------------------------------------------------------------------------------------- linears
class HessianStat(nnx.Module):
    """The Hessian pass's calibrator on a GPTQ linear's input quantizer: runs the linear with its input quantizer
    fake-quantizing and accumulates ``hessian_update`` of the quantized input."""

    def __init__(self, in_features: int):
        self.hessian = SmoothingStat(jnp.zeros((in_features, in_features), jnp.float32))
        self.count = SmoothingStat(jnp.zeros((), jnp.float32))

    def collect(self, x, token_mask):  # pragma: no cover - the linear's hook takes the call
        return None

    def linear_call(self, linear, x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
        iq = linear.input_quantizer
        iq.set_mode("fake_quant")
        try:
            xq = iq(x, token_mask=token_mask)
        finally:
            iq.set_mode("calibrate")
        self.hessian.value, self.count.value = hessian_update(self.hessian.value, self.count.value, xq, token_mask)
        y = linear.matmul(xq, linear.weight_quantizer(linear.weight[...]))
        return linear.output_quantizer(y, token_mask=token_mask)


def gptq_sites(sites: list[Site]) -> list[Site]:
    """The weight sites GPTQ updates (enabled weight quantizers of jaxquant ``Linear`` s), in model order.

    Raises:
      UnsupportedError: a weight quantizer GPTQ cannot work with (module doc), naming it.
    """
    out = []
    for s in sites:
        if not s.is_gemm_weight or not s.quantizer.enabled:
            continue
        q, cfg = s.quantizer, s.config
        why = None
        if s.stacked:
            why = "stacked MoE experts are not supported by gptq yet"
        elif not isinstance(getattr(s.parent, "input_quantizer", None), TensorQuantizer) or \
                not callable(getattr(s.parent, "matmul", None)):
            why = "it is not a jaxquant Linear (an input quantizer and matmul())"
        elif cfg.is_dynamic or cfg.fixed_amax is not None or (cfg.block_sizes is not None and (
                cfg.block_sizes.type == "dynamic" or cfg.block_sizes.other_axes)):
            why = (f"its format {cfg.format} has no static per-element amax (dynamic or 2-D blocks); use static "
                   "weights (nvfp4_static, fp8, int8 per channel, int4 blocks)")
        elif q.bias is not None:
            why = "its quantizer carries a bias"
        elif getattr(q, "svdquant_lora_a", None) is not None:
            why = "it carries SVDQuant low-rank factors (svdquant cannot precede gptq)"
        if why is not None:
            raise UnsupportedError(f"gptq: {s.path}: {why}.")
        out.append(s)
    return out


def fold_weight_pre_quant_scales(gsites: list[Site]) -> int:
    """Fold a smoothed weight's scale into the weight, as ModelOpt's ``apply_pre_quant_scale_and_smooth`` does
    (``W <- W * (1 / pre_quant_scale)`` rounded to the model dtype), so that GPTQ updates the weight the GEMM sees.

    SmoothQuant / AWQ leave the factor on the weight quantizer (``calibration/smoothing.py``); the product is the same
    tensor the quantizer's fake quant and the exporter compute, so folding changes no value. Returns how many weights
    were folded.
    """
    n = 0
    for s in gsites:
        q = s.quantizer
        if q.pre_quant_scale is None:
            continue
        w0 = s.parent.weight[...]
        folded = apply_pre_quant_scale(w0, q.pre_quant_scale.value)
        s.parent.weight.value = jax.device_put(folded, w0.sharding) if isinstance(w0, jax.Array) else folded
        q.set_pre_quant_scale(None)
        n += 1
    return n


def update_weight(site: Site, hessian: jax.Array, perc_damp: float, gptq_block: int) -> tuple[float, bool]:
    """Run GPTQ on one linear (``hessian [in, in]``) and write its weight back in place (model dtype, same device).
    Returns ``(relative Hessian-weighted error, Hessian positive definite)`` (ModelOpt's log line).

    Raises:
      NonFiniteError: the updated weight holds NaN or Inf.
    """
    from jaxquant.calibration.stages import on_default_device

    q, cfg, lin = site.quantizer, site.config, site.parent
    param = lin.weight
    w0 = param[...]
    w, amax, gamax = on_default_device([w0, q.amax.value, None if q.global_amax is None else q.global_amax.value])
    w32 = w.astype(jnp.float32)
    kind = quantizer_format(cfg.format)
    amax_el = jnp.broadcast_to(kind.amax_per_element(amax, w32.shape, q.block_size), w32.shape)
    slab = cfg.block_sizes.size if cfg.block_sizes is not None and cfg.block_sizes.size else 1
    slab_shape = tuple(kind.amax_shape(cfg, (w32.shape[0], slab), None))
    u, ok = hessian_inverse(hessian, w32, perc_damp)
    new = blockwise_update(w32, u, amax_el, gamax, fmt=cfg.format, block_size=q.block_size, slab=slab,
                           slab_amax_shape=slab_shape, gptq_block=gptq_block)
    if not bool(jnp.all(jnp.isfinite(new))):
        raise NonFiniteError(f"gptq: the updated weight of {site.names[0]} holds NaN or Inf.")
    d = new - w32
    hd = jnp.dot(d, hessian, precision=_HI)
    rel = float(jnp.mean(hd * d) / (jnp.mean(jnp.dot(w32, hessian, precision=_HI) * w32) + 1e-6))
    val = new.astype(w0.dtype)
    param.value = jax.device_put(val, w0.sharding) if isinstance(w0, jax.Array) else val
    return rel, bool(ok)


@functools.partial(nnx.jit, static_argnames=("carried",))
def _layer_call(layer, x, kwargs, carried: tuple[str, ...]):
    y = layer(x, **kwargs)
    return y, {k: kwargs[k] for k in carried}


def _set_pass_modes(sites: list[Site], weights: str) -> list[tuple[TensorQuantizer, str]]:
    """Every enabled quantizer fake-quantizing, weight quantizers in ``weights`` mode; returns the old modes."""
    saved = [(s.quantizer, s.quantizer.mode) for s in sites]
    for s in sites:
        q = s.quantizer
        q.set_mode("off" if not q.enabled else weights if s.role == "weight" else "fake_quant")
    return saved


def _restore_modes(saved) -> None:
    for q, mode in saved:
        q.set_mode(mode)


def collect_hessians(gsites: list[Site], run) -> dict[str, jax.Array]:
    """``{site path: H [in, in]}`` of every GPTQ linear over what ``run()`` feeds the model (the modes of the Hessian
    pass already set): a ``HessianStat`` on each linear's input quantizer while ``run`` runs."""
    iqs = [(s, s.parent.input_quantizer) for s in gsites]
    saved = [(iq, iq.mode) for _, iq in iqs]
    for s, iq in iqs:
        iq.calibrator = HessianStat(int(s.parent.weight[...].shape[-1]))
        iq.set_mode("calibrate")
    try:
        run()
        return {s.path: iq.calibrator.hessian.value for s, iq in iqs}
    finally:
        for _, iq in iqs:
            iq.calibrator = None
        _restore_modes(saved)


def update_weights(gsites: list[Site], hessians: MutableMapping[str, jax.Array], opts: Mapping[str, Any]) -> None:
    """``update_weight`` of every site in ``gsites`` with its Hessian (ModelOpt's per-linear log line at INFO).
    Each Hessian is removed from ``hessians`` once used, so the device frees them one by one (all of a 32-layer 8B
    model's are ~39 GB in float32)."""
    for s in gsites:
        rel, ok = update_weight(s, hessians.pop(s.path), opts["perc_damp"], opts["block_size"])
        if not ok:
            log.warning("gptq: %s: the Hessian is not positive definite; using the identity (plain rounding)",
                        s.names[0])
        log.info("gptq: [%s] relative MSE error %.2e", s.names[0], rel)


class LayerwiseGptq:
    """The layerwise driver's ``layer_hook`` (``calibration.layerwise``): after decoder layer ``i`` has been
    max-calibrated on its inputs, its Hessian pass, weight update and (``qdq``) quantized outputs."""

    def __init__(self, model: Any, sites: list[Site], gsites: list[Site], opts: Mapping[str, Any]):
        self.text = model.model
        self.opts = opts
        self.qdq = bool(opts.get("layerwise_qdq", True))
        self.per_layer: list[tuple[list[Site], list[Site]]] = []
        for layer in self.text.layers:
            ids = {id(node) for _, node in iter_modules(layer) if isinstance(node, TensorQuantizer)}
            self.per_layer.append(([s for s in sites if id(s.quantizer) in ids],
                                   [s for s in gsites if id(s.quantizer) in ids]))

    def _run(self, i: int, acts: list[tuple]) -> list[tuple]:
        layer, carried = self.text.layers[i], tuple(getattr(self.text, "carried_kwargs", ()))
        out = []
        for x, ctx, ok in acts:
            y, new = _layer_call(layer, x, self.text.layer_kwargs(i, ctx), carried)
            out.append((y, {**ctx, **new} if new else ctx, ok & jnp.all(jnp.isfinite(y))))
        return out

    def after_layer(self, i: int, inputs: list[tuple], outputs: list[tuple]) -> list[tuple]:
        """The next layer's ``(x, ctx, ok)`` per batch, after GPTQ of layer ``i`` (module doc, steps 2-4)."""
        lsites, gsites = self.per_layer[i]
        if gsites:
            saved = _set_pass_modes(lsites, "off")
            try:
                hessians = collect_hessians(gsites, lambda: self._run(i, inputs))
            finally:
                _restore_modes(saved)
            update_weights(gsites, hessians, self.opts)
        if not self.qdq:
            return outputs
        saved = _set_pass_modes(lsites, "fake_quant")
        try:
            return self._run(i, inputs)
        finally:
            _restore_modes(saved)

    def save(self, ckpt, i: int) -> None:
        """Layer ``i``'s updated weights to the checkpoint directory (``resume.LayerCheckpoint.save_tensors``)."""
        ckpt.save_tensors(f"gptq_layer_{i}", {s.path: s.parent.weight[...] for s in self.per_layer[i][1]})

    def restore(self, ckpt, next_layer: int) -> None:
        """The updated weights of layers ``0 .. next_layer - 1`` from the checkpoint, into the model."""
        for i in range(min(next_layer, len(self.per_layer))):
            saved = ckpt.load_tensors(f"gptq_layer_{i}")
            for s in self.per_layer[i][1]:
                param = s.parent.weight
                param.value = jnp.asarray(saved[s.path], param[...].dtype)


def gptq_calibrate(model: Any, sites: list[Site], data: Any, *, options: Mapping[str, Any] | None = None,
                   layerwise: bool = False, layerwise_checkpoint_dir: str | None = None, layerwise_save_every: int = 1,
                   forward=None, progress: bool = True, total_tokens: int | None = None,
                   max_seq_len: int | None = None, mesh=None, **_):
    """ModelOpt's ``gptq`` up to (not including) ``finalize`` (module doc); ``options`` from ``parse_options``.
    Rewrites the weights of the GPTQ linears in place. Returns the calibration forward's ``CalibrationStats``.

    Raises:
      DataError: no calibration batches.
      UnsupportedError: a weight quantizer GPTQ cannot handle, a mesh, a ``forward_loop`` callable.
    """
    from jaxquant.calibration.max import (
        calibrate_weights,
        check_weights_finite,
        default_forward,
        run_calibration,
        set_calibration_modes,
    )
    from jaxquant.calibration.mse import share_global_amax

    opts = dict(options or parse_options({}))
    if data is None:
        raise DataError("gptq needs calibration data (the Hessian of every linear's inputs).")
    if callable(data) and not hasattr(data, "__iter__"):
        raise UnsupportedError("gptq needs calibration batches, not a forward_loop callable.")
    if mesh is not None:
        raise UnsupportedError("gptq over a device mesh is not implemented yet; calibrate on one device.")
    if isinstance(data, collections.abc.Iterator):
        data = list(data)
    forward = forward or default_forward
    gsites = gptq_sites(sites)
    fold_weight_pre_quant_scales(gsites)
    calibrate_weights(sites, model)
    check_weights_finite(sites)
    share_global_amax(sites)  # ModelOpt's max_calibrate: fused siblings' static NVFP4 global amax, promoted
    set_calibration_modes(sites)
    t0 = time.perf_counter()
    if layerwise or layerwise_checkpoint_dir is not None:
        from jaxquant.calibration.layerwise import run_calibration_layerwise

        stats = run_calibration_layerwise(model, sites, data, forward=forward, progress=progress,
                                          max_seq_len=max_seq_len, checkpoint_dir=layerwise_checkpoint_dir,
                                          save_every=layerwise_save_every,
                                          layer_hook=LayerwiseGptq(model, sites, gsites, opts))
    else:
        kw = dict(forward=forward, progress=progress, total_tokens=total_tokens, max_seq_len=max_seq_len)
        stats = run_calibration(model, sites, data, **kw)
        saved = _set_pass_modes(sites, "off")
        try:
            hessians = collect_hessians(gsites, lambda: run_calibration(model, sites, data, **kw))
        finally:
            _restore_modes(saved)
        update_weights(gsites, hessians, opts)
    stats.search_s = time.perf_counter() - t0 - stats.run_s - stats.compile_s
    log.info("gptq: %d linear(s) updated (perc_damp %s, block_size %d)", len(gsites), opts["perc_damp"],
             opts["block_size"])
    return stats


__all__ = ["DEFAULTS", "HessianStat", "LayerwiseGptq", "OPTIONS", "blockwise_update", "collect_hessians",
           "fold_weight_pre_quant_scales", "gptq_calibrate", "gptq_sites", "hessian_inverse", "hessian_update", "parse_options", "update_weight",
           "update_weights"]
