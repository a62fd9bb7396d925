"""Streamed layer-by-layer quantization: models larger than the device and than host memory.

``quantize_streamed(loaded, source, resolution, batches, export=...)`` runs what ``quantize(..., layerwise=True)``
followed by ``export_hf`` runs, without ever holding the whole model. ``loaded`` comes from ``converters.open_hf``
or ``converters.synthetic.open_synthetic``: its parameters are ``ShapeDtypeStruct`` leaves, and ``source`` (the
memory-mapped safetensors, or the synthetic generator) is read one stage at a time:

1. **Shell** (embeddings, final norm, head, Gemma 4's per-layer tables): read into host memory (``park``) and kept
   until the end; its weight amax; its export tensors handed to the export (its activation scales come last).
2. **Prologue** over every calibration batch: the hidden states between two layers stay on the device
   (``rows x seq x hidden`` in the model dtype).
3. **Decoder layer i**: its parameters read from ``source`` straight to the device (on a reader thread, while
   layer i - 1 runs: reading overlaps the device work); its weight amax; every batch
   through it (``stages.StagedStep``: the same executables, hence the same statistics as the whole-model order for
   ``max``); its amax finalized (``finalize`` over the layer's quantizers: fused siblings and MoE experts never span
   two layers); its export tensors computed on the device and written into the export's shards
   (``export.streamed.StreamedExport.publish``). Then its parameters are dropped from the device and the host.
4. **Head** over every batch, the shell's activation scales, ``finish()``: the JSON files, validation, publish.

Peak device memory: two decoder layers (the one running, the next one being read) + the activations + the export
kernels' buffers (+ the shell during the prologue and the head). Host memory: the shell, one layer being read (two
layers on the CPU backend, where the device is the host) and the export's in-flight tensors, whatever the depth; each
layer's mapped checkpoint pages are released again after its stage (``_release``). Only ``max`` streams: an algorithm
that searches or changes weights (``mse``, ``awq``, ``smoothquant``, ``local_hessian``) needs them after the forward
passes (``streaming_refusal``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
from flax import nnx

from jaxquant.calibration.finalize import FinalizeReport, finalize, site_configs
from jaxquant.calibration.max import (
    CalibrationStats,
    check_weights_finite,
    device_batches,
    non_finite_activations,
    set_calibration_modes,
    set_quant_mode,
    weight_jobs,
)
from jaxquant.calibration.sites import Site, quantizer_sites
from jaxquant.calibration.stages import StagedStep, on_default_device, without_layers
from jaxquant.calibration.state import calibration_state, load_calibration_state
from jaxquant.errors import DataError, UnsupportedError

log = logging.getLogger("jaxquant.calibration")

#: The calibration algorithms the streamed path runs. Others need every weight after the forward passes.
STREAMABLE = ("max",)


def streaming_refusal(algorithm: str | None, options: dict[str, Any] | None = None) -> str | None:
    """Why a recipe's calibration cannot stream (None: it can). ``algorithm``: the method name (None: no
    calibration); ``options``: its parsed options (``calibration.algorithms.resolve_algorithm``)."""
    options = options or {}
    if algorithm not in STREAMABLE:
        return (f"algorithm {algorithm or 'null'} cannot stream yet (only {', '.join(STREAMABLE)} does: the others "
                "search or change weights after the forward passes, so they need every layer's weights at the end)")
    if options.get("layerwise_checkpoint_dir"):
        return "per-layer checkpoints (layerwise.checkpoint_dir, --layerwise-checkpoint) are not implemented with streaming"
    return None


@dataclasses.dataclass
class Stages:
    """Which parameters (``converters.hf.LoadItem``), quantizer sites and export tensors each stage owns: stage
    ``i`` is decoder layer ``i``, ``None`` the shell. Names are canonical HF names."""

    prefix: str  # HF name prefix of the decoder layers, e.g. "model.layers."
    n_layers: int
    load: dict[int | None, list]
    sites: dict[int | None, list[Site]]

    @classmethod
    def of(cls, loaded, source, dtype) -> Stages:
        """Group ``loaded``'s parameters (checked against ``source``: ``plan_load``) and quantizer sites."""
        from jaxquant.converters.hf import plan_load

        model = loaded.model
        prefix = loaded.name_map.hf_name("model.layers") + "."
        n = len(model.model.layers)
        plan = plan_load(loaded.config, source, nnx.state(model, nnx.Param), dtype=dtype, name_map=loaded.name_map)
        st = cls(prefix, n, {i: [] for i in [None, *range(n)]}, {i: [] for i in [None, *range(n)]})
        for it in plan:
            st.load[st.stage_of(it.hf)].append(it)
        for s in quantizer_sites(model):
            st.sites[st.stage_of(s.names[0])].append(s)
        return st

    def stage_of(self, name: str) -> int | None:
        """The decoder layer a (canonical HF) tensor, module or quantizer name belongs to; None: the shell."""
        if not name.startswith(self.prefix):
            return None
        head = name[len(self.prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < self.n_layers else None

    def include(self, stage: int | None) -> Callable[[str], bool]:
        """The name predicate of one stage (``plan_entries(include=...)``)."""
        return lambda name: self.stage_of(name) == stage


def _drop(items) -> None:
    """Put the parameters of ``items`` back to ``ShapeDtypeStruct`` leaves (device and host memory freed)."""
    for it in items:
        v = it.var.get_value()
        it.var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype))


def _calibrate_weights(module) -> None:
    """Set ``module``'s weight amax from its weights (``max.weight_reducer``: one jitted call, shared by equal
    layers)."""
    from jaxquant.calibration import ahead
    from jaxquant.quantizer.tensor_quantizer import QuantAmax, QuantGlobalAmax

    parts = [(module, *nnx.split(module, (QuantAmax, QuantGlobalAmax), ...))]
    (exe,) = ahead.compile_all(weight_jobs(parts))
    _, _, stats, rest = parts[0]
    nnx.update(module, exe(stats, rest))


def _release(items, source) -> None:
    """Drop the mapped checkpoint pages of ``items`` from this process again (``source.release``; a no-op for a
    source without a memory map). On the CPU backend ``jax.device_put`` of a 64-byte aligned numpy view of the
    map makes no copy: the parameter aliases the mapped pages, which the loader released once, but the weight
    amax, the forward passes and the export read them back in. Without this, every layer stored aligned in its
    shard stayed in the RSS as file pages after its stage (measured: benchmarks/bench_host_rss.py, docs/scale.md)."""
    release = getattr(source, "release", None)
    if release is not None:
        for it in items:
            release(it.hf)


def _merge_report(into: FinalizeReport, rep: FinalizeReport) -> None:
    into.moe_groups += rep.moe_groups
    into.uncalibrated_experts.update(rep.uncalibrated_experts)
    into.moe_fallbacks += rep.moe_fallbacks
    into.fused_groups += rep.fused_groups
    into.fused_conflicts += rep.fused_conflicts
    into.zero_amax += rep.zero_amax


def _finalize_stage(model, sites: list[Site], options: dict[str, Any], report: FinalizeReport) -> None:
    """``quantize``'s finalize over one stage's quantizers (fused groups and MoE experts stay within a layer)."""
    if not sites:
        return
    kw = {"shared_patterns": options["shared_patterns"]} if options.get("shared_patterns") is not None else {}
    state, rep = finalize(calibration_state(model, sites), site_configs(sites),
                          sync_expert_weight_amax=options.get("sync_expert_weight_amax", False), **kw)
    load_calibration_state(model, state, sites=sites)
    _merge_report(report, rep)


def quantize_streamed(loaded: Any, source: Any, resolution: Any, batches: Iterable[Any], *, dtype,
                      export: Any = None, progress: bool = True, max_seq_len: int | None = None,
                      park: Any = None, options: dict[str, Any] | None = None, workers: int | None = None):
    """Calibrate (``max``, layer by layer) and export the model of ``loaded`` reading its parameters from
    ``source`` one stage at a time (module doc). Returns ``(QuantizeResult, ExportSummary or None)``; the result's
    ``timings`` (seconds) are ``load`` (waiting for parameters: the next layer is read while one runs), ``weights``, ``compile``, ``calibrate`` (forward passes),
    ``finalize``, ``export`` (waiting on the export writer) and ``total``.

    Args:
      loaded: a ``LoadedModel`` with abstract parameters whose quantizers ``resolution`` (``apply_recipe``) set.
      source: its ``TensorSource``.
      batches: calibration batches (as ``quantize``).
      dtype: the load dtype.
      export: a ``StreamedExport`` to publish each stage into (None: calibration only).
      park: where the shell's parameters live between its stages (a CPU device beside an accelerator; None: the
        default device).
      options: the recipe algorithm's parsed options (finalize's ``shared_patterns``, ``sync_expert_weight_amax``).
      workers: reader threads (``converters.hf.load_params``; a synthetic source is thread-safe: ``LOAD_WORKERS``).

    Raises:
      UnsupportedError: a model without decoder stages.
      CheckpointError / NonFiniteError / DataError: as ``load_hf`` and ``quantize``, naming the layer.
    """
    from jaxquant.calibration.api import QuantizeResult
    from jaxquant.calibration.layerwise import _bar
    from jaxquant.converters.hf import load_params

    options = options or {}
    model = loaded.model
    t_start = time.perf_counter()
    timings = {"load": 0.0, "weights": 0.0, "compile": 0.0, "calibrate": 0.0, "finalize": 0.0, "export": 0.0}
    stages = Stages.of(loaded, source, dtype)
    if stages.n_layers == 0 or not callable(getattr(model.model, "prologue", None)):
        raise UnsupportedError("streamed quantization needs a causal LM with decoder layers (jaxquant's model classes).")
    sites = quantizer_sites(model)
    report = FinalizeReport()
    stats = CalibrationStats()

    def timed(key, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timings[key] += time.perf_counter() - t0

    def load(stage, where):
        items = stages.load[stage]
        if where is not None:
            items = [dataclasses.replace(it, sharding=jax.sharding.SingleDeviceSharding(where)) for it in items]
        timed("load", load_params, items, source, dtype=dtype, workers=workers)

    # decoder layer i + 1 is read (host reads and copies to the device) while layer i runs on the device
    reader = cf.ThreadPoolExecutor(1, thread_name_prefix="jaxquant-prefetch")
    reads: dict[int, cf.Future] = {}

    def prefetch(i):
        if i < stages.n_layers and i not in reads:
            reads[i] = reader.submit(load_params, stages.load[i], source, dtype=dtype, workers=workers)

    def wait_for_layer(i):  # the time the calibration waits for the layer's parameters counts as "load"
        prefetch(i)
        timed("load", reads.pop(i).result)

    # ---- the shell: parameters, weight amax, its tensors of the export
    load(None, park)
    with without_layers(model) as shell:
        timed("weights", _calibrate_weights, shell)
    check_weights_finite(stages.sites[None])
    needs = set_calibration_modes(sites)
    if export is not None:
        timed("export", export.publish, stages.include(None), activations=False, wait=False)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    data = list(device_batches(batches, vocab_size=vocab_size, max_seq_len=max_seq_len)) if needs else []
    if needs and not data:
        raise DataError("no calibration batch: the data iterable was empty.")
    step = StagedStep(model)
    t0 = time.perf_counter()
    for key in dict.fromkeys((tuple(ids.shape), mask is not None) for _, ids, mask, _ in data):
        step.compile(*key)
        stats.shapes.append(key[0])
    timings["compile"] = stats.compile_s = time.perf_counter() - t0

    def shell_write_back():  # the shell's live amax arrays (donated to the stage calls) back into the model
        with without_layers(model) as shell:
            nnx.update(shell, step.shell.amax_state())

    def check(oks, where: str):
        bad = [i for (i, *_), ok in zip(data, jax.device_get(oks)) if not bool(ok)]
        if bad:
            shell_write_back()
            raise non_finite_activations(sites, where, bad[0])

    bar = _bar(stages.n_layers + 2, progress)
    try:
        prefetch(0)  # read while the prologue runs
        shell_rest = on_default_device(step.shell.rest)
        step.shell.amax = on_default_device(step.shell.amax)
        acts = [timed("calibrate", step.run_prologue, ids, mask, shell_rest) for _, ids, mask, _ in data]
        shell_rest = None  # a parked shell's device copy: not kept while the layers run
        check([a[2] for a in acts], "the embeddings")
        if bar is not None:
            bar.update(1)
        for i in range(stages.n_layers):
            layer = model.model.layers[i]
            wait_for_layer(i)
            prefetch(i + 1)
            timed("weights", _calibrate_weights, layer)
            check_weights_finite(stages.sites[i])
            step.refresh(i)
            t0 = time.perf_counter()
            acts = [step.run_layer(i, x, ctx, ok) for x, ctx, ok in acts]
            jax.block_until_ready([a[0] for a in acts])
            timings["calibrate"] += time.perf_counter() - t0
            nnx.update(layer, step.layers[i].amax_state())
            check([a[2] for a in acts], f"decoder layer {i}")
            timed("finalize", _finalize_stage, model, stages.sites[i], options, report)
            if export is not None:
                timed("export", export.publish, stages.include(i))
            _drop(stages.load[i])
            step.refresh(i)  # its abstract leaves: nothing of the layer stays referenced
            _release(stages.load[i], source)
            if bar is not None:
                bar.update(1)
        t0 = time.perf_counter()
        shell_rest = on_default_device(step.shell.rest)
        oks = [step.run_epilogue(x, ctx, ok, shell_rest) for x, ctx, ok in acts]
        del acts, shell_rest
        shell_write_back()
        timings["calibrate"] += time.perf_counter() - t0
        check(oks, "the head")
        timed("finalize", _finalize_stage, model, stages.sites[None], options, report)
        if export is not None:
            timed("export", export.publish, stages.include(None), refresh=True)
        if bar is not None:
            bar.update(1)
    finally:
        for f in reads.values():  # after a failure: no reader thread is left setting parameters
            f.cancel()
        reader.shutdown(wait=True)
        if bar is not None:
            bar.close()
    stats.run_s = timings["calibrate"]
    stats.batches = len(data)
    stats.tokens = sum(n for *_, n in data)
    state = calibration_state(model, sites)
    set_quant_mode(sites, "fake_quant")
    summary = None
    if export is not None:
        summary = timed("export", export.finish)
    _drop(stages.load[None])
    timings["total"] = time.perf_counter() - t_start
    return QuantizeResult(resolution, state, timings, stats, report, "max"), summary


__all__ = ["STREAMABLE", "Stages", "quantize_streamed", "streaming_refusal"]
