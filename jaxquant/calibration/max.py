"""Max calibration (ModelOpt's ``max_calibrate``) as jitted forward passes.

1. ``calibrate_weights``: every enabled weight quantizer takes its amax from its weight (no data),
   ModelOpt's ``weight_only_quantize``. Stacked expert weights are reduced per expert.
2. ``run_calibration``: quantizers are put in calibration mode (data-calibrated activation
   quantizers collect ``amax = max(amax, max|x|)`` over real tokens; every other quantizer is
   identity, as ModelOpt's ``enable_stats_collection`` disables quantization during calibration),
   then each batch goes through the jitted step (``calibration_step``): stage by stage (prologue,
   each decoder layer, head: ``stages.py``; equal layers share one executable) for a causal LM, else
   one whole-model call ``step(amax, rest, input_ids, mask) -> amax`` built with ``nnx.split`` /
   ``nnx.merge``. The amax arrays stay on the device and are donated from call to call; the
   model's output is discarded, so XLA drops the work nothing depends on (the LM head).
   Compilation happens once per batch shape (ahead of time, so it is timed separately). Each
   batch is sent to the device while the previous step runs, and the host waits only on the "all finite" flag of the step ``FLAG_LAG`` (2) batches back, which keeps the
   device queue full, lets the progress bar report real tokens/s, and names the first batch that
   produced a NaN/Inf activation.
3. ``finalize.py`` then checks, synchronises MoE experts and unifies fused siblings.

Padding never raises amax: the model passes ``token_mask`` (from ``attention_mask``) to every
activation quantizer, which ignores masked positions. ModelOpt lets pads count (hf_ptq pads on
the left with EOS, so its statistics include the EOS embedding path at pad positions); jaxquant
deliberately does not, so the amax depends only on the real text, not on how it was batched.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.calibration.sites import Site
from jaxquant.errors import DataError, NonFiniteError, UnsupportedError
from jaxquant.quantizer.tensor_quantizer import QuantAmax

log = logging.getLogger("jaxquant.calibration")

Batch = tuple[np.ndarray, np.ndarray | None]
ForwardFn = Callable[[Any, jax.Array, jax.Array | None], Any]


def default_forward(model, input_ids, attention_mask):
    """``model(input_ids, attention_mask)`` (a causal LM's call)."""
    return model(input_ids, attention_mask)


# ----------------------------------------------------------------------------------------------- modes
def set_quant_mode(model_or_sites: Any, mode: str) -> None:
    """Put every enabled quantizer in ``mode``: ``"off"``, ``"calibrate"`` or ``"fake_quant"``."""
    sites = model_or_sites if isinstance(model_or_sites, list) else None
    if sites is None:
        from jaxquant.calibration.sites import quantizer_sites

        sites = quantizer_sites(model_or_sites)
    for s in sites:
        s.quantizer.set_mode(mode if s.quantizer.enabled else "off")


def set_calibration_modes(sites: list[Site]) -> int:
    """Calibration mode for data-calibrated activation quantizers, identity for all others.
    Returns how many quantizers collect statistics."""
    n = 0
    for s in sites:
        if s.calibrates_from_data:
            s.quantizer.set_mode("calibrate")
            n += 1
        else:
            s.quantizer.set_mode("off")
    return n


# ----------------------------------------------------------------------------------------------- weights
def _weight_sites(sites: list[Site]) -> list[Site]:
    return [s for s in sites
            if s.role == "weight" and s.quantizer.enabled and s.quantizer.config.fixed_amax is None]


def calibrate_weights(sites: list[Site], model: Any = None, mesh=None) -> int:
    """Weight amax from the weights (ModelOpt ``weight_only_quantize``). Returns the count.

    With ``model`` given, the weights are reduced by jitted calls: one per decoder layer and one for the rest of a
    causal LM (equal layers share one executable, ``weight_parts``), else one for the whole model; otherwise
    quantizer by quantizer, eagerly. ``mesh``: the model's state is laid out over it (``jaxquant.mesh``); the
    amax come back replicated.
    """
    todo = _weight_sites(sites)
    if not todo:
        return 0
    if model is None:
        for s in todo:
            s.quantizer.calibrate_weight(s.weight())
        return len(todo)
    from jaxquant.calibration import ahead

    with weight_parts(model) as parts:
        exes = ahead.compile_all(weight_jobs(parts, mesh))
        from jaxquant.mesh import settle

        for (module, _, stats, rest), exe in zip(parts, exes):
            nnx.update(module, exe(stats, rest) if mesh is None else settle(exe(stats, rest)))
    return len(todo)


@contextlib.contextmanager
def weight_parts(model):
    """``[(module, graphdef, stats, rest)]`` to reduce apart: the model without its decoder layers and each layer
    for a causal LM with the stage protocol (``stages.supports_stages``), else the whole model. ``stats`` holds
    the amax and global amax; the layers are detached from the model while the context is open."""
    from jaxquant.calibration.stages import supports_stages, without_layers
    from jaxquant.quantizer.tensor_quantizer import QuantGlobalAmax

    def split(m):
        return (m, *nnx.split(m, (QuantAmax, QuantGlobalAmax), ...))

    if not supports_stages(model, default_forward):
        yield [split(model)]
        return
    layers = list(model.model.layers)
    with without_layers(model) as shell:
        yield [split(shell)] + [split(layer) for layer in layers]


def weight_jobs(parts, mesh=None) -> list:
    """``[(store key, lower)]`` of the weight reduction of each of ``weight_parts``' parts (for
    ``ahead.compile_all``)."""
    return [(weight_reducer_key(g, stats, rest),
             lambda g=g, stats=stats, rest=rest: weight_reducer(g, mesh).lower(stats, rest))
            for _, g, stats, rest in parts]


def weight_reducer(graphdef, mesh=None) -> Callable:
    """The jitted ``(amax state, rest) -> amax state`` that sets every enabled weight quantizer's amax
    (and NVFP4-static global amax) from its weight; with a ``mesh``, the amax state comes back replicated."""
    from jaxquant.mesh import constrain_replicated

    from jaxquant.calibration.sites import quantizer_sites
    from jaxquant.quantizer.tensor_quantizer import QuantGlobalAmax

    @jax.jit
    def reduce(stats, rest):
        m = nnx.merge(graphdef, stats, rest)
        for s in _weight_sites(quantizer_sites(m)):
            s.quantizer.calibrate_weight(s.weight())
        return constrain_replicated(mesh, nnx.state(m, (QuantAmax, QuantGlobalAmax)))

    return reduce


def weight_reducer_key(graphdef, stats, rest):
    """The ahead-of-time store key of ``weight_reducer(graphdef)`` for these states."""
    from jaxquant.calibration.ahead import leaf_signature

    leaves, treedef = jax.tree_util.tree_flatten((stats, rest))
    return ("weights", graphdef, treedef, leaf_signature(leaves))


def step_key(graphdef, amax_def, rest_def, amax_leaves, rest_leaves, ids_shape, has_mask: bool, forward):
    """The ahead-of-time store key of the calibration step."""
    from jaxquant.calibration.ahead import leaf_signature

    sig = leaf_signature(list(amax_leaves) + list(rest_leaves))
    return ("step", graphdef, amax_def, rest_def, sig, tuple(ids_shape), has_mask, forward)


def check_weights_finite(sites: list[Site]) -> None:
    """``NonFiniteError`` naming the weights that hold NaN or Inf (their amax is not finite)."""
    flags = {s.path: jnp.all(jnp.isfinite(s.quantizer.amax.value)) for s in _weight_sites(sites)}
    if not flags:
        return
    ok = jax.device_get(flags)
    bad = [s for s in _weight_sites(sites) if not bool(ok[s.path])]
    if bad:
        names = [s.names[0] if not s.stacked else f"{s.path} (experts)" for s in bad]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise NonFiniteError(
            f"the weights quantized by {shown} hold NaN or Inf; the checkpoint is corrupt or was converted to "
            "a dtype that overflows."
        )


def activation_sites_need_data(sites: list[Site]) -> bool:
    return any(s.calibrates_from_data for s in sites)


# ----------------------------------------------------------------------------------------------- batches
def as_batch(b: Any, index: int) -> Batch:
    """``{"input_ids", "attention_mask"}`` / ``(ids, mask)`` / ``ids`` -> int32 numpy ``[B, S]`` pair."""
    if isinstance(b, dict):
        if "input_ids" not in b:
            raise DataError(f"calibration batch {index}: a dict batch needs 'input_ids' (got keys {sorted(b)}).")
        ids, mask = b["input_ids"], b.get("attention_mask")
    elif isinstance(b, (tuple, list)) and len(b) == 2:
        ids, mask = b
    else:
        ids, mask = b, None
    on_device = isinstance(ids, jax.Array)
    ids = ids if on_device else np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise DataError(f"calibration batch {index}: input_ids must be [batch, seq], got shape {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"calibration batch {index}: input_ids must be integer token ids, got {ids.dtype}.")
    if mask is not None:
        mask = mask if isinstance(mask, jax.Array) else np.asarray(mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise DataError(f"calibration batch {index}: attention_mask {mask.shape} does not match input_ids "
                            f"{ids.shape}.")
        mask = mask.astype(np.int32) if mask.dtype != np.int32 else mask
    return (ids.astype(np.int32) if ids.dtype != np.int32 else ids), mask


def batch_tokens(ids, mask) -> int:
    return int(np.asarray(mask).sum()) if mask is not None else int(ids.size)


def device_batches(batches: Iterable[Any], *, vocab_size: int | None, max_seq_len: int | None, mesh=None):
    """``(index, ids, mask, real tokens)`` per batch of ``batches``, validated (``as_batch``, length, token ids) and
    sent to the device; a generator, so a batch is sent while the previous one computes. With a ``mesh``, each
    device gets whole batches of the given shape (``jaxquant.mesh.global_batches``: ``data x fsdp`` of them per
    step, ``index`` the first one's).

    Raises:
      DataError: a malformed batch, sequences longer than ``max_seq_len``, token ids outside the vocabulary.
    """
    from jaxquant.data.batching import check_token_ids

    def checked():
        for i, raw in enumerate(batches):
            ids, mask = as_batch(raw, i)
            if max_seq_len is not None and ids.shape[1] > max_seq_len:
                raise DataError(
                    f"calibration batch {i} has sequences of {ids.shape[1]} tokens, more than the model's "
                    f"max_position_embeddings ({max_seq_len}); use a shorter --calib-seq."
                )
            check_token_ids(ids, vocab_size, mask=mask, what=f"calibration batch {i}")
            yield i, ids, mask, batch_tokens(ids, mask)

    if mesh is not None:
        from jaxquant.mesh import global_batches

        yield from global_batches(checked(), mesh)
        return
    for i, ids, mask, n_tok in checked():
        yield i, jax.device_put(ids), None if mask is None else jax.device_put(mask), n_tok


#: How many batches the host may run ahead of the device before it checks a step's "all finite" flag.
FLAG_LAG = 2


# ----------------------------------------------------------------------------------------------- the step
@dataclasses.dataclass
class CalibrationStats:
    """Counters and timings of ``run_calibration``."""

    batches: int = 0
    tokens: int = 0  # real (unmasked) tokens
    compile_s: float = 0.0
    run_s: float = 0.0
    search_s: float = 0.0  # an algorithm's weight search after the forward passes (mse)
    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: a layerwise run resumed from a checkpoint: ``(file, the stage it resumed at)``
    resumed: tuple[str, str] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.run_s if self.run_s > 0 else float("nan")


def make_step(graphdef, amax_def, rest_def, forward: ForwardFn = default_forward, mesh=None, rest_shardings=None):
    """The jitted calibration step ``(amax_leaves, rest_leaves, ids, mask) -> (amax_leaves, all_finite)``.

    The model state travels as flat lists of arrays (not ``nnx.State`` pytrees): flattening an NNX
    state of a few hundred variables costs milliseconds of Python per call, more than a small
    model's whole step on an accelerator. ``amax_leaves`` is donated (with a ``mesh``: replicated in and out;
    ``rest_shardings``: what the parameters are constrained to inside the step, ``jaxquant.mesh.compute_shardings``).
    """
    from jaxquant.mesh import constrain, constrain_replicated

    def step(amax_leaves, rest_leaves, ids, mask):
        amax = jax.tree_util.tree_unflatten(amax_def, amax_leaves)
        rest = jax.tree_util.tree_unflatten(rest_def, constrain(rest_leaves, rest_shardings))
        m = nnx.merge(graphdef, amax, rest)
        forward(m, ids, mask)
        new_leaves, new_def = jax.tree_util.tree_flatten(nnx.state(m, QuantAmax))
        if new_def != amax_def:  # pragma: no cover - a forward that adds or drops quantizer state
            raise RuntimeError("the calibration forward changed the structure of the quantizer state")
        finite = (jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in new_leaves]))) if new_leaves
                  else jnp.bool_(True))
        return constrain_replicated(mesh, (new_leaves, finite))

    return jax.jit(step, donate_argnums=(0,))


class WholeModelStep:
    """The calibration step as one jitted whole-model call (any model and ``forward``); the interface of
    ``stages.StagedStep``: ``compile(ids_shape, has_mask)``, ``run(ids, mask) -> flag``, ``amax_leaves()``,
    ``write_back()``."""

    def __init__(self, model, forward: ForwardFn = default_forward, mesh=None):
        self.model = model
        self.forward = forward
        self.mesh = mesh
        self.graphdef, amax_state, rest = nnx.split(model, QuantAmax, ...)
        self.amax, self.amax_def = jax.tree_util.tree_flatten(amax_state)
        self.rest, self.rest_def = jax.tree_util.tree_flatten(rest)
        from jaxquant.mesh import compute_shardings, replicate

        if mesh is not None:
            self.amax = replicate(mesh, self.amax)
        self._step = make_step(self.graphdef, self.amax_def, self.rest_def, forward, mesh,
                               compute_shardings(mesh, self.rest))
        self._exe: dict[tuple, Any] = {}

    def compile_jobs(self, ids_shape: tuple[int, int], has_mask: bool) -> list:
        """``[(store key, lower)]`` of the step for ``[B, S]`` batches, for ``ahead.compile_all``."""
        key = step_key(self.graphdef, self.amax_def, self.rest_def, self.amax, self.rest, ids_shape, has_mask,
                       self.forward)
        sharding = None
        if self.mesh is not None:
            from jaxquant.mesh import batch_sharding

            sharding = batch_sharding(self.mesh, ids_shape)
        ids = jax.ShapeDtypeStruct(tuple(ids_shape), jnp.int32, sharding=sharding)
        return [(key, lambda: self._step.lower(self.amax, self.rest, ids, ids if has_mask else None))]

    def compile(self, ids_shape: tuple[int, int], has_mask: bool) -> int:
        """Compile (or find in ``calibration.ahead``'s store) the step for ``[B, S]`` batches. Returns 1."""
        from jaxquant.calibration.ahead import compile_all

        shape_key = (tuple(ids_shape), has_mask)
        if shape_key not in self._exe:
            self._exe[shape_key] = compile_all(self.compile_jobs(ids_shape, has_mask))[0]
        return 1

    def run(self, ids, mask):
        """One batch; returns its device "all amax finite" flag."""
        out = self._exe[(tuple(ids.shape), mask is not None)](self.amax, self.rest, ids, mask)
        if self.mesh is not None:
            from jaxquant.mesh import settle

            out = settle(out)
        self.amax, flag = out
        return flag

    def amax_leaves(self):
        return self.amax

    def write_back(self) -> None:
        nnx.update(self.model, jax.tree_util.tree_unflatten(self.amax_def, self.amax))


def calibration_step(model, forward: ForwardFn = default_forward, mesh=None):
    """The step ``run_calibration`` uses: stage by stage (``stages.StagedStep``) for a causal LM with the stage
    protocol and the default forward, else one whole-model call (``WholeModelStep``); ``mesh``: the model's state
    is laid out over it (``jaxquant.mesh``)."""
    from jaxquant.calibration.stages import StagedStep, supports_stages

    return StagedStep(model, mesh) if supports_stages(model, forward) else WholeModelStep(model, forward, mesh)


def non_finite_activations(sites: list[Site], where: str, batch: int | None = None) -> NonFiniteError:
    """The error for NaN/Inf statistics found at ``where`` ("calibration batch 3", "decoder layer 5" with ``batch``),
    naming the quantizers whose amax is not finite (the model must hold the live amax)."""
    names = _non_finite_names(sites)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    in_batch = "" if batch is None else f" in calibration batch {batch}"
    return NonFiniteError(
        f"{where} produced NaN or Inf activations{in_batch} at {shown or 'a quantizer'}. "
        "Check the checkpoint and the dtype (float16 overflows easily; try --dtype bfloat16 or float32)."
    )


def _non_finite_names(sites: list[Site]) -> list[str]:
    out = []
    for s in sites:
        if s.calibrates_from_data and not bool(np.all(np.isfinite(np.asarray(s.quantizer.amax.value)))):
            out.append(s.names[0] if not s.stacked else f"{s.path} (experts)")
    return out


def _progress(total: int | None, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="tok", unit_scale=True, desc="calibrating", file=sys.stderr,
                dynamic_ncols=True, leave=True)


def run_calibration(model: Any, sites: list[Site], batches: Iterable[Any], *,
                    forward: ForwardFn = default_forward, progress: bool = True,
                    total_tokens: int | None = None, max_seq_len: int | None = None, mesh=None) -> CalibrationStats:
    """Run the calibration forward passes over ``batches`` (modes must already be set).

    Args:
      batches: ``{"input_ids", "attention_mask"}`` dicts, ``(ids, mask)`` pairs or id arrays.
      forward: ``forward(model, ids, mask)``; its output is ignored.
      progress: show a tqdm bar (tokens, tokens/s) on stderr.
      total_tokens: for the bar, when known.
      max_seq_len: refuse longer batches (the model's ``max_position_embeddings``).
      mesh: the ``jax.sharding.Mesh`` the model's state is laid out over (``jaxquant.mesh.place_model``); the
        batches are split by rows over it. None: one device.

    Raises:
      NonFiniteError: a batch produced NaN/Inf activations (names the batch and quantizers).
      DataError: malformed batches, no batch at all, sequences too long, token ids outside the
        model's vocabulary.
    """
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)  # XLA gathers clamp silently
    stats = CalibrationStats()
    step = calibration_step(model, forward, mesh)
    compiled: set[tuple] = set()
    bar = _progress(total_tokens, progress)
    pending: collections.deque = collections.deque()  # (batch index, finite flag, tokens), oldest first
    t_run = 0.0

    def settle(p):
        i, flag, n_tok = p
        if not bool(flag):
            step.write_back()
            raise non_finite_activations(sites, f"calibration batch {i}")
        if bar is not None:
            bar.update(n_tok)

    try:
        source = device_batches(batches, vocab_size=vocab_size, max_seq_len=max_seq_len, mesh=mesh)  # one ahead
        nxt = next(source, None)
        while nxt is not None:
            i, ids, mask, n_tok = nxt
            key = (tuple(ids.shape), mask is not None)
            if key not in compiled:
                t0 = time.perf_counter()
                step.compile(*key)
                compiled.add(key)
                dt = time.perf_counter() - t0
                stats.compile_s += dt
                if bar is not None:  # keep compilation out of the bar's tokens/s
                    bar.start_t += dt
                    bar.last_print_t += dt
                stats.shapes.append(tuple(ids.shape))
            t0 = time.perf_counter()
            flag = step.run(ids, mask)
            pending.append((i, flag, n_tok))
            nxt = next(source, None)  # host work for the next batch overlaps this step
            while len(pending) > FLAG_LAG:
                settle(pending.popleft())  # waits for an older step only
            t_run += time.perf_counter() - t0
            stats.batches += 1
            stats.tokens += n_tok
        t0 = time.perf_counter()
        jax.block_until_ready(step.amax_leaves())
        t_run += time.perf_counter() - t0
        while pending:
            settle(pending.popleft())
    finally:
        close_step(step, bar)
    if stats.batches == 0:
        raise DataError("no calibration batch: the data iterable was empty.")
    stats.run_s = t_run
    return stats


def close_step(step, bar) -> None:
    """After a calibration run, successful or not: close its progress bar and hand the model the live amax arrays
    (its own were donated to the step)."""
    if bar is not None:
        bar.close()
    try:
        step.write_back()
    except Exception:  # pragma: no cover - a failed step may have consumed them
        pass


def run_forward_loop(model: Any, sites: list[Site], forward_loop: Callable[[Any], Any]) -> CalibrationStats:
    """ModelOpt-style calibration: ``forward_loop(model)`` calls the model itself (eagerly, or
    under ``nnx.jit``); quantizers in calibration mode update their amax in place."""
    stats = CalibrationStats()
    t0 = time.perf_counter()
    forward_loop(model)
    jax.block_until_ready(nnx.state(model, QuantAmax))
    stats.run_s = time.perf_counter() - t0
    stats.batches = -1  # unknown
    return stats


def max_calibrate(model: Any, sites: list[Site], data: Any, *, forward: ForwardFn = default_forward,
                  progress: bool = True, total_tokens: int | None = None, max_seq_len: int | None = None,
                  skip_forward_without_activation_calib: bool = True, layerwise: bool = False,
                  on_weights_calibrated: Callable[[], Any] | None = None, layerwise_checkpoint_dir: str | None = None,
                  layerwise_save_every: int = 1,
                  mesh=None) -> CalibrationStats:
    """ModelOpt's ``max`` up to (not including) ``finalize``: weights, then the forward passes.

    ``data``: an iterable of batches, a ``forward_loop(model)`` callable, or None (weights only;
    refused when an activation quantizer needs data). ``layerwise``: layer by layer over all batches
    (``calibration/layerwise.py``; the same amax, one decoder layer's parameters on the device at a time).
    ``on_weights_calibrated()`` is called once the weight amax are set and checked, before any forward pass.
    ``layerwise_checkpoint_dir`` / ``layerwise_save_every``: per-layer checkpoints to resume from
    (``calibration/resume.py``; layerwise only).
    ``mesh``: the model's state is laid out over this ``jax.sharding.Mesh`` (``jaxquant.mesh.place_model``).
    """
    calibrate_weights(sites, model, mesh)
    check_weights_finite(sites)
    if on_weights_calibrated is not None:
        on_weights_calibrated()
    needs = set_calibration_modes(sites)
    if needs == 0 and skip_forward_without_activation_calib:
        log.info("max: no activation quantizer needs data (all constant, dynamic or disabled); weights only.")
        return CalibrationStats()
    if data is None:
        raise DataError(
            f"{needs} activation quantizer(s) need calibration data, but none was given; pass calibration "
            "batches or a forward_loop."
        )
    if callable(data) and not hasattr(data, "__iter__"):
        if layerwise:
            raise UnsupportedError("layerwise calibration needs calibration batches, not a forward_loop callable.")
        stats = run_forward_loop(model, sites, data)
    elif layerwise:
        from jaxquant.calibration.layerwise import run_calibration_layerwise

        stats = run_calibration_layerwise(model, sites, data, forward=forward, progress=progress,
                                          max_seq_len=max_seq_len, checkpoint_dir=layerwise_checkpoint_dir,
                                          save_every=layerwise_save_every, mesh=mesh)
    else:
        if layerwise_checkpoint_dir is not None:
            raise UnsupportedError("a layerwise checkpoint directory needs layer-by-layer calibration (layerwise: "
                                   "{enable: true}, or --layerwise).")
        stats = run_calibration(model, sites, data, forward=forward, progress=progress, total_tokens=total_tokens,
                                max_seq_len=max_seq_len, mesh=mesh)
    load_calibrator_amax(sites)
    return stats


def load_calibrator_amax(sites: list[Site]) -> int:
    """Let every activation calibrator that computes its quantizer's amax (``load_amax(quantizer)``, e.g.
    ``act_headroom.HeadroomHistogram``) replace the max amax, as ModelOpt's ``load_calib_amax`` after the max
    forward. Returns how many did."""
    n = 0
    for s in sites:
        load = getattr(s.quantizer.calibrator, "load_amax", None)
        if callable(load):
            load(s.quantizer)
            n += 1
    return n


__all__ = [
    "CalibrationStats",
    "as_batch",
    "calibrate_weights",
    "default_forward",
    "load_calibrator_amax",
    "make_step",
    "max_calibrate",
    "run_calibration",
    "WholeModelStep",
    "calibration_step",
    "device_batches",
    "weight_jobs",
    "weight_parts",
    "run_forward_loop",
    "set_calibration_modes",
    "set_quant_mode",
]
