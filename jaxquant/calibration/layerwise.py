"""Layer-by-layer calibration: every batch through the prologue, then decoder layer 0 over all batches, then layer
1 on layer 0's outputs, ..., then the head (ModelOpt's ``layerwise: {enable: true}``).

The stages are ``stages.StagedStep``'s executables, so the statistics are the ones the batch-by-batch step
collects (for ``max`` the same amax bit for bit: each layer sees the same inputs). What changes is what must be on
the device at once: one layer's parameters, plus every batch's activations between two layers (``rows x seq x
hidden`` in the model dtype, e.g. 2 GiB for 512 x 512 tokens of Llama-8B). Parameters that live elsewhere (a model
loaded to host memory) are copied to the device one stage at a time and dropped after it, so the device never holds
the whole model. Algorithms that work per layer build on this order through a ``layer_hook``: after layer ``i``'s
calibration pass its amax are written into the model and ``layer_hook.after_layer(i, inputs, outputs)`` returns the
activations the next layer reads (GPTQ: the Hessian pass, the weight update and the layer's quantized outputs,
``calibration/gptq.py``); with a checkpoint directory ``layer_hook.save(ckpt, i)`` keeps what it changed and
``layer_hook.restore(ckpt, next_layer)`` puts it back on resume.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

import jax

from jaxquant.calibration.max import CalibrationStats, close_step, device_batches
from jaxquant.calibration.sites import Site
from jaxquant.calibration.stages import StagedStep, on_default_device, supports_stages
from jaxquant.errors import DataError, UnsupportedError

log = logging.getLogger("jaxquant.calibration")


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="layer", desc="calibrating layer by layer", file=sys.stderr, dynamic_ncols=True)


def run_calibration_layerwise(model: Any, sites: list[Site], batches: Iterable[Any], *, forward: Any = None,
                              progress: bool = True, max_seq_len: int | None = None,
                              checkpoint_dir: str | None = None, save_every: int = 1,
                              mesh=None, layer_hook: Any = None) -> CalibrationStats:
    """Calibrate ``model`` (quantizer modes already set) layer by layer over ``batches``. ``mesh``: the model's
    state is laid out over this ``jax.sharding.Mesh``; each stage's parameters stay where they are (sharded) and
    the batches are split by rows (``jaxquant.mesh``).

    ``checkpoint_dir``: save the state every ``save_every`` layers there and resume from it (``calibration.resume``).
    ``layer_hook``: an algorithm's per-layer step (module doc); not with a ``mesh``.

    Raises:
      CheckpointError: ``checkpoint_dir`` holds another run's checkpoint, or it cannot be written.
      UnsupportedError: a model without the stage protocol or a custom ``forward`` (their forward is one call).
      NonFiniteError: NaN/Inf statistics, naming the layer and the first batch.
      DataError: as ``run_calibration`` (malformed or empty batches, too long, ids outside the vocabulary).
    """
    from jaxquant.calibration.max import default_forward, non_finite_activations

    forward = forward or default_forward
    if not supports_stages(model, forward):
        raise UnsupportedError("layerwise calibration needs a causal LM with decoder layers (jaxquant's model "
                               "classes) and the default forward; calibrate this model without layerwise.")
    stats = CalibrationStats()
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    step = StagedStep(model, mesh)
    data = list(device_batches(batches, vocab_size=vocab_size, max_seq_len=max_seq_len, mesh=mesh))
    if not data:
        raise DataError("no calibration batch: the data iterable was empty.")
    t0 = time.perf_counter()
    for key in dict.fromkeys((tuple(ids.shape), mask is not None) for _, ids, mask, _ in data):
        step.compile(*key)
        stats.shapes.append(key[0])
    stats.compile_s = time.perf_counter() - t0

    def check(oks, where: str):
        bad = [i for (i, *_), ok in zip(data, jax.device_get(oks)) if not bool(ok)]
        if bad:
            step.write_back()
            raise non_finite_activations(sites, where, bad[0])

    if layer_hook is not None and mesh is not None:
        raise UnsupportedError("a per-layer calibration algorithm over a mesh is not implemented yet.")
    if checkpoint_dir is not None and mesh is not None:
        raise UnsupportedError("per-layer checkpoints of a calibration over a mesh are not implemented yet: drop "
                               "the checkpoint directory or the mesh.")
    parts = [step.shell, *step.layers]
    n = len(step.layers)
    ckpt = resumed = None
    if checkpoint_dir is not None:
        from jaxquant.calibration.resume import LayerCheckpoint, fingerprint

        configs = [(s.names[0], repr(s.quantizer.config)) for s in sites]
        ckpt = LayerCheckpoint(checkpoint_dir, fingerprint([p.amax for p in parts], data, configs), save_every)
        resumed = ckpt.load()
    bar = _bar(n + 2, progress)
    t0 = time.perf_counter()
    for part in parts:  # statistics are small: all on the device, wherever the weights are
        part.amax = on_default_device(part.amax, mesh)
    try:
        rest = on_default_device(step.shell.rest, mesh)
        if resumed is not None:
            where = (f"decoder layer {resumed.next_layer}" if resumed.next_layer < n else
                     "the head" if resumed.next_layer == n else "its end (nothing left to run)")
            stats.resumed = (str(ckpt.path), where)
            log.info("resuming the layerwise calibration from %s at %s", ckpt.path, where)
            for part, saved in zip(parts, resumed.parts_amax, strict=True):
                part.amax = on_default_device([jax.numpy.asarray(a) for a in saved], mesh)
            acts = jax.tree_util.tree_map(jax.numpy.asarray, resumed.acts)
            start = resumed.next_layer
            if layer_hook is not None:
                layer_hook.restore(ckpt, start)
            if bar is not None:
                bar.update(min(start, n + 1) + 1)
        else:
            acts = [step.run_prologue(ids, mask, rest) for _, ids, mask, _ in data]  # (x, ctx, ok) per batch
            check([a[2] for a in acts], "the embeddings")
            start = 0
            if bar is not None:
                bar.update(1)
        for i in range(start, n):
            rest_i = on_default_device(step.layers[i].rest, mesh)
            outs = [step.run_layer(i, x, ctx, ok, rest_i) for x, ctx, ok in acts]
            del rest_i
            check([a[2] for a in outs], f"decoder layer {i}")
            if layer_hook is not None:
                outs = _hooked(step, i, layer_hook, acts, outs)
                check([a[2] for a in outs], f"decoder layer {i} ({type(layer_hook).__name__})")
                if ckpt is not None:
                    layer_hook.save(ckpt, i)
            acts = outs
            if ckpt is not None and ckpt.due(i + 1, n):
                ckpt.save(i + 1, [p.amax for p in parts], acts)
            if bar is not None:
                bar.update(1)
        if start <= n:
            oks = [step.run_epilogue(x, ctx, ok, rest) for x, ctx, ok in acts]
            check(oks, "the head")
            if ckpt is not None:
                ckpt.save(n + 1, [p.amax for p in parts], [])
            if bar is not None:
                bar.update(1)
    finally:
        close_step(step, bar)
    stats.run_s = time.perf_counter() - t0
    stats.batches = len(data)
    stats.tokens = sum(n for *_, n in data)
    return stats


def _hooked(step: StagedStep, i: int, hook: Any, inputs: list, outputs: list) -> list:
    """``hook.after_layer`` with layer ``i``'s live amax in the model, and whatever amax it sets read back."""
    from flax import nnx

    from jaxquant.quantizer.tensor_quantizer import QuantAmax

    layer, part = step.text.layers[i], step.layers[i]
    nnx.update(layer, part.amax_state())
    out = hook.after_layer(i, inputs, outputs)
    leaves, treedef = jax.tree_util.tree_flatten(nnx.state(layer, QuantAmax))
    if treedef != part.amax_def:  # pragma: no cover - a hook that leaves a statistic attached
        raise RuntimeError(f"{type(hook).__name__} changed the quantizer state layout of decoder layer {i}")
    part.amax = leaves
    return out


__all__ = ["run_calibration_layerwise"]
