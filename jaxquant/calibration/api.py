"""``quantize(model, recipe, data)``: ModelOpt's ``mtq.quantize`` for Flax NNX models.

    result = quantize(model, "general/ptq/nvfp4_default-kv_fp8", batches)
    model(input_ids, attention_mask)         # now fake-quantized, bit-exact with ModelOpt
    result.calibration_state                 # {"model.layers.0.self_attn.q_proj.input_quantizer._amax": ...}

Steps: resolve the recipe on the model's quantizers (``apply_recipe``), run the recipe's calibration
algorithm (``max``: weight amax from the weights, activation amax as a running max over the batches in
one jitted call per batch; ``mse``: ``max``, then a search of each weight's amax), finalize (NaN/Inf check, MoE expert sync and fallbacks, NVFP4 fused-sibling
unification), write the final amax back, and leave every enabled quantizer in ``fake_quant`` mode.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxquant.calibration.algorithms import resolve_algorithm
from jaxquant.calibration.finalize import FinalizeReport, finalize, site_configs
from jaxquant.calibration.max import (
    CalibrationStats,
    as_batch,
    batch_tokens,
    calibrate_weights,
    default_forward,
    set_quant_mode,
)
from jaxquant.calibration.sites import Site, quantizer_sites
from jaxquant.calibration.state import calibration_state, load_calibration_state
from jaxquant.errors import DataError, UnsupportedError
from jaxquant.numerics.checks import check_params_finite

log = logging.getLogger("jaxquant.calibration")

CPU_BATCH_SIZE = 8


@dataclasses.dataclass
class QuantizeResult:
    """What ``quantize`` did.

    Attributes:
      resolution: the recipe's resolution on the model (``report()`` prints it), or None when the
        model was configured before.
      calibration_state: the final ``{"<quantizer>._amax": array}`` (see ``state.py``); save it
        with ``save_calibration_state``.
      timings: seconds per phase: ``apply_recipe``, ``weights``, ``compile``, ``calibrate``,
        ``search`` (an algorithm's weight search, ``mse``), ``finalize``, ``total``.
      stats: batches, real tokens, tokens/s of the calibration forward passes.
      report: what ``finalize`` changed (MoE sync, fallbacks, fused groups, conflicts).
      algorithm: the calibration method that ran (None: none).
    """

    resolution: Any
    calibration_state: dict[str, np.ndarray]
    timings: dict[str, float]
    stats: CalibrationStats
    report: FinalizeReport
    algorithm: str | None

    def summary(self) -> str:
        s = self.stats
        lines = [f"calibration ({self.algorithm or 'none'}): {s.batches if s.batches >= 0 else '?'} batches, "
                 f"{s.tokens} tokens in {s.run_s:.2f} s"
                 + (f" ({s.tokens_per_s:,.0f} tokens/s), compile {s.compile_s:.2f} s" if s.tokens else "")]
        if s.resumed is not None:
            lines.append(f"resumed the layerwise calibration from {s.resumed[0]} at {s.resumed[1]}")
        extra = self.report.summary()
        if extra:
            lines.append(extra)
        return "\n".join(lines)


def _recipe_algorithm(resolution: Any, recipe: Any) -> Any:
    rec = getattr(resolution, "recipe", None)
    if rec is not None:
        return rec.algorithm
    if isinstance(recipe, Mapping):
        return recipe.get("algorithm", "max")
    return "max"


def _rows_to_batches(data: Mapping, batch_size: int | None, model) -> tuple[list, int]:
    ids, mask = as_batch(data, 0)
    bs = batch_size or auto_batch_size(model, ids.shape[1], ids.shape[0])
    out = [(ids[i:i + bs], None if mask is None else mask[i:i + bs]) for i in range(0, ids.shape[0], bs)]
    return out, bs


def _total_tokens(data: Any) -> int | None:
    n = getattr(data, "num_tokens", None)
    if isinstance(n, int):
        return n
    if isinstance(data, (list, tuple)):
        total = 0
        for i, b in enumerate(data):
            ids, mask = as_batch(b, i)
            total += batch_tokens(ids, mask)
        return total
    return None


def auto_batch_size(model: Any, seq_len: int, n_rows: int | None = None, *, device=None,
                    memory_fraction: float = 0.8, sample_ratio: float = 1.1, free_bytes: int | None = None) -> int:
    """A calibration batch size that fits the device (hf_ptq's ``--batch_size 0``).

    CPU: ``CPU_BATCH_SIZE`` (8). Accelerators: the compiled memory need of one ``[1, seq_len]``
    forward (XLA's ``memory_analysis``, nothing is run) times ``sample_ratio`` (hf_ptq's 1.1) per
    row, into ``memory_fraction`` of the free device memory; regulated like hf_ptq to 1, 2 or a
    multiple of 4, at most 512, and at most ``n_rows``. ``free_bytes`` replaces the device's free memory
    (for a model whose weights are not loaded yet; see ``ahead.py``); ``model`` may be abstract.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        b = CPU_BATCH_SIZE
    else:
        b = _probe_batch_size(model, seq_len, device, memory_fraction, sample_ratio, free_bytes)
    if n_rows is not None:
        b = min(b, max(1, n_rows))
    return max(1, b)


def free_device_bytes(device=None) -> int | None:
    """Bytes the device reports free (``bytes_limit - bytes_in_use``), or None for a backend without memory
    statistics."""
    try:
        stats = (device or jax.devices()[0]).memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _probe_batch_size(model, seq_len, device, memory_fraction, sample_ratio, free_bytes=None) -> int:
    try:
        free = free_bytes if free_bytes is not None else (free_device_bytes(device) or 0)
        graphdef, state = nnx.split(model)

        def fwd(state, ids, mask):
            m = nnx.merge(graphdef, state)
            out = m.hidden_states(ids, mask) if hasattr(m, "hidden_states") else default_forward(m, ids, mask)
            return jax.numpy.sum(out)

        shape = jax.ShapeDtypeStruct((1, seq_len), jax.numpy.int32)
        mem = jax.jit(fwd).lower(state, shape, shape).compile().memory_analysis()
        per_row = max(1, int(getattr(mem, "temp_size_in_bytes", 0) * sample_ratio))
        b = int(free * memory_fraction // per_row) if free > 0 else 8
    except Exception as e:  # pragma: no cover - backend without memory stats
        log.info("batch-size probe failed (%s); using 8", e)
        b = 8
    if b >= 4:
        b = min(512, b // 4 * 4)
    return max(1, b)


def quantize(
    model: Any,
    recipe: Any,
    data: Any = None,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    forward: Callable[[Any, Any, Any], Any] | None = None,
    strict: bool | str = False,
    max_seq_len: int | None = None,
    layerwise: bool = False,
    on_weights_calibrated: Callable[[], Any] | None = None,
    check_finite: bool = True,
    layerwise_checkpoint: str | None = None,
    mesh: Any = None,
) -> QuantizeResult:
    """Quantize ``model`` in place with ``recipe`` and calibration ``data``; leaves it fake-quantized.

    Args:
      model: an NNX model with ``TensorQuantizer`` sites (a jaxquant decoder, or your own modules
        following the same conventions).
      recipe: a recipe name or path (``"general/ptq/fp8_default-kv_fp8"``), a ``Recipe``, a
        ModelOpt-style config dict (``{"quant_cfg": [...], "algorithm": "max"}``), or the
        ``Resolution`` of an ``apply_recipe`` already done on this model.
      data: calibration data: an iterable of batches (``{"input_ids", "attention_mask"}`` dicts,
        ``(ids, mask)`` pairs, ``CalibBatches``), one dict / pair of ``[N, S]`` arrays that is split
        into batches of ``batch_size``, or a ModelOpt-style ``forward_loop(model)`` callable. None:
        weights only (refused when an activation quantizer needs data).
      batch_size: rows per batch when ``data`` is one ``[N, S]`` array pair (None: ``auto_batch_size``).
      progress: a tqdm progress bar with tokens/s.
      forward: ``forward(model, input_ids, attention_mask)`` for models whose call differs.
      strict: passed to ``apply_recipe`` (unmatched enabling rules become errors).
      max_seq_len: refuse longer sequences (default: ``model.config.max_position_embeddings``).
      layerwise: calibrate layer by layer over all batches (``calibration/layerwise.py``; also what a recipe's
        ``algorithm: {method: max, layerwise: {enable: true}}`` asks for): the same statistics, one decoder
        layer's parameters on the device at a time.
      on_weights_calibrated: called with no argument once the weights' amax are final and before the first
        forward pass, by algorithms that leave the weights alone (``Algorithm.early_weights``: ``max``); never
        called otherwise. ``jaxquant ptq`` starts writing the export there (``export.early``).
      check_finite: first check every parameter for NaN / Inf (``NonFiniteError``); False only when the caller
        just did (``jaxquant ptq`` checks right after loading).
      layerwise_checkpoint: a directory for per-layer checkpoints of a layerwise calibration (implies
        ``layerwise``; overrides the recipe's ``layerwise.checkpoint_dir``): a run interrupted after layer i resumes
        at layer i + 1 when started again with the same directory, model, recipe and data (``calibration/resume.py``).
      mesh: calibrate over a ``jax.sharding.Mesh`` (``jaxquant.mesh``): a ``Mesh`` from ``jaxquant.mesh.make_mesh``
        or a spec for it (``"tensor=2,fsdp=4"``, ``{"fsdp": 8}``, ``""`` for every device on ``fsdp``). The model's
        state is placed on it (parameters by their family's partition rules, unless already laid out over it) and
        the batches are split by rows. None: the mesh the parameters are already laid out over (a model loaded
        with ``load_hf(..., mesh=...)``), else one device.

    Returns:
      A ``QuantizeResult``.

    Raises:
      RecipeError / UnsupportedError: recipe problems (unknown algorithm, unsupported formats).
      DataError: no or malformed data, sequences longer than the model allows.
      NonFiniteError: NaN / Inf activations or weights (names the batch and quantizers).
    """
    from jaxquant.numerics._exact import warn_if_gpu_division_flag_ignored
    from jaxquant.recipe import apply_recipe
    from jaxquant.recipe.matcher import Resolution

    warn_if_gpu_division_flag_ignored()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    if isinstance(recipe, Resolution):
        resolution = recipe
    else:
        resolution = apply_recipe(model, recipe, strict=strict)
    algo, options = resolve_algorithm(_recipe_algorithm(resolution, recipe))
    sites: list[Site] = quantizer_sites(model)
    from jaxquant.mesh import place_model, resolve

    mesh = resolve(model, mesh)
    if mesh is not None:
        place_model(model, mesh)
    timings["apply_recipe"] = time.perf_counter() - t0
    if check_finite:
        check_params_finite(model)  # before any forward: XLA:CPU's max can hide a NaN from the statistics

    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(data, Mapping) or (isinstance(data, tuple) and len(data) == 2
                                     and np.ndim(data[0]) == 2 and not isinstance(data[0], (dict, tuple))):
        data, _ = _rows_to_batches(data if isinstance(data, Mapping) else
                                   {"input_ids": data[0], "attention_mask": data[1]}, batch_size, model)

    stats = CalibrationStats()
    if algo is None:
        t0 = time.perf_counter()
        calibrate_weights(sites, model, mesh)
        timings["weights"] = time.perf_counter() - t0
        needing = [s.names[0] for s in sites if s.calibrates_from_data]
        if needing:
            raise UnsupportedError(
                f"the recipe's algorithm is null (no calibration), but {len(needing)} activation quantizer(s) "
                f"need calibrated amax (e.g. {needing[0]}); use algorithm: max, or make them dynamic."
            )
    else:
        t0 = time.perf_counter()
        stats = algo.run(
            model, sites, data,
            forward=forward or default_forward,
            progress=progress,
            total_tokens=_total_tokens(data),
            max_seq_len=max_seq_len,
            skip_forward_without_activation_calib=options.get("skip_forward_without_activation_calib", True),
            **_layerwise_kwargs(layerwise, layerwise_checkpoint, options),
            **({"on_weights_calibrated": on_weights_calibrated}
               if on_weights_calibrated is not None and algo.early_weights else {}),
            **{k: options[k] for k in algo.run_options if k in options},
            **({"options": options} if "options" in algo.run_options else {}),
            **({"mesh": mesh} if mesh is not None else {}),
        )
        elapsed = time.perf_counter() - t0
        timings["compile"] = stats.compile_s
        timings["calibrate"] = stats.run_s
        if stats.search_s:
            timings["search"] = stats.search_s
        timings["weights"] = max(0.0, elapsed - stats.compile_s - stats.run_s - stats.search_s)

    t0 = time.perf_counter()
    state = calibration_state(model, sites)
    fin_kw = {}
    if options.get("shared_patterns") is not None:
        fin_kw["shared_patterns"] = options["shared_patterns"]
    state, report = finalize(state, site_configs(sites),
                             sync_expert_weight_amax=options.get("sync_expert_weight_amax", False), **fin_kw)
    load_calibration_state(model, state, sites=sites)
    set_quant_mode(sites, "fake_quant")
    timings["finalize"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return QuantizeResult(resolution, state, timings, stats, report, algo.name if algo else None)


def _layerwise_kwargs(layerwise: bool, checkpoint: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The algorithm's layerwise keyword arguments from ``quantize``'s and the recipe's settings (none when off)."""
    directory = checkpoint if checkpoint is not None else options.get("layerwise_checkpoint_dir")
    if not (layerwise or options.get("layerwise") or checkpoint is not None):
        return {}  # a recipe's checkpoint_dir without layerwise enabled: nothing to checkpoint (as in ModelOpt)
    out: dict[str, Any] = {"layerwise": True}
    if directory is not None:
        out["layerwise_checkpoint_dir"] = str(directory)
        out["layerwise_save_every"] = options.get("layerwise_save_every", 1)
    return out


def check_sequence_length(model: Any, seq_len: int, *, what: str = "--calib-seq") -> None:
    """``DataError`` when ``seq_len`` exceeds the model's ``max_position_embeddings``."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(
            f"{what} {seq_len} is longer than the model allows (max_position_embeddings = {limit}); use "
            f"{what} {limit} or less."
        )


__all__ = ["CPU_BATCH_SIZE", "QuantizeResult", "auto_batch_size", "check_sequence_length", "quantize"]
