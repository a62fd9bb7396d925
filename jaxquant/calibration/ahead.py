"""Compile the calibration computations ahead of time, from the model's shapes alone.

XLA compiles the whole-model calibration step from shapes and dtypes, not from values: it can
start as soon as the config and the recipe are known, while the weights are still being read.
``compile_calibration_ahead(config, dtype, recipe, batch_shape)`` builds the model abstractly
(``nnx.eval_shape``, no memory), applies the recipe, and compiles the same computations that
``max_calibrate`` runs (the weight-amax reduction and the calibration step's stages for one batch shape);
the executables go into a process-wide store keyed by everything the compilation depends on
(graph definition, tree structures, leaf shapes and dtypes, batch shape). ``calibrate_weights``
and ``run_calibration`` look there first and compile themselves only on a miss, so a key that does
not match (another batch shape, a model placed on several devices) costs nothing but the
ahead-of-time work.

``jaxquant ptq`` runs this on a thread while the checkpoint loads (``cli_ptq``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger("jaxquant.calibration")

#: Executables kept (least recently used dropped first): a run needs a few (weights, prologue, one per layer
#: kind, epilogue, export kernels); tests that build many models must not accumulate them.
MAX_STORED = 32

# (key, executable), most recently used last. A list compared with ``==``, not a dict: NNX graph definitions
# compare equal across two builds of the same model but do not hash equal.
_STORE: list[tuple[Any, Any]] = []
_LOCK = threading.Lock()


def leaf_signature(leaves: list[Any]) -> tuple:
    """``((shape, dtype, placement), ...)`` of arrays or ``ShapeDtypeStruct``s. ``placement`` is None for what an
    executable compiled for the default device accepts (a ``ShapeDtypeStruct``, an array on the default device
    alone), else the array's sharding: keys of computations over arrays placed elsewhere (several devices, host
    memory) never match the default-placement ones, and still match each other."""
    default = jax.devices()[0]
    out = []
    for x in leaves:
        placement = None
        if isinstance(x, jax.Array) and x.sharding.device_set != {default}:
            placement = x.sharding
        out.append((tuple(x.shape), str(x.dtype), placement))
    return tuple(out)


def lookup(key: Any) -> Any:
    """The executable stored under a key equal to ``key`` (None for a miss or a None key)."""
    if key is None:
        return None
    with _LOCK:
        for i, (k, exe) in enumerate(_STORE):
            if k == key:
                _STORE.append(_STORE.pop(i))
                return exe
    return None


def store(key: Any, executable: Any) -> None:
    """Keep ``executable`` for ``key`` (a None key is ignored)."""
    if key is None:
        return
    with _LOCK:
        _STORE[:] = [(k, e) for k, e in _STORE if k != key]
        _STORE.append((key, executable))
        del _STORE[:-MAX_STORED]


#: Threads compiling at once (XLA's compiler releases the GIL; one program compiles on one core).
COMPILE_THREADS = 8


def compile_all(jobs: list[tuple[Any, Callable[[], Any]]], on_lowered: Callable[[], Any] | None = None) -> list[Any]:
    """Executables for ``jobs`` = ``[(key, lower)]``, ``lower()`` returning a ``jax.stages.Lowered``: each from the
    store when its key is there, else lowered on this thread (lowering is Python: it holds the interpreter) and
    compiled by XLA, which releases it, the misses on ``COMPILE_THREADS`` threads at once (each starts as soon as
    its job is lowered), and stored. Jobs with equal keys compile once. ``on_lowered()`` is called once every miss is
    lowered. Returns the executables in the order of ``jobs``."""
    import concurrent.futures as cf

    out: list[Any] = [lookup(k) for k, _ in jobs]
    owner = [next(j for j in range(i + 1) if jobs[j][0] == jobs[i][0]) for i in range(len(jobs))]  # first equal key
    todo = [i for i in range(len(jobs)) if out[i] is None and owner[i] == i]

    def build(i, lowered):
        exe = lowered.compile()
        store(jobs[i][0], exe)
        return exe

    if len(todo) <= 1:
        lowered = [jobs[i][1]() for i in todo]
        if on_lowered is not None:
            on_lowered()
        built = [build(i, lo) for i, lo in zip(todo, lowered)]
    else:
        with cf.ThreadPoolExecutor(min(COMPILE_THREADS, len(todo)), thread_name_prefix="jaxquant-xla") as pool:
            futures = [pool.submit(build, i, jobs[i][1]()) for i in todo]
            if on_lowered is not None:
                on_lowered()
            built = [f.result() for f in futures]
    done = dict(zip(todo, built))
    return [exe if exe is not None else (out[owner[i]] or done[owner[i]]) for i, exe in enumerate(out)]


def clear() -> None:
    """Forget every stored executable."""
    with _LOCK:
        _STORE.clear()


class _Once:
    """``fn`` (may be None) as a callable that runs it on its first call only."""

    def __init__(self, fn: Callable[[], Any] | None):
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


@dataclasses.dataclass
class AheadResult:
    """What ``compile_calibration_ahead`` compiled: executables stored, seconds spent, the batch
    size it chose (``auto_batch_size`` when asked for one, else the given one)."""

    compiled: int
    seconds: float
    batch_size: int
    #: the abstract model with the recipe applied (for ``warm_export_kernels`` after the calibration compile)
    model: Any = dataclasses.field(default=None, repr=False, compare=False)


def compile_calibration_ahead(config: Any, dtype: Any, recipe: Any, seq_len: int, batch_size: int | None, *,
                              n_rows: int | None = None, free_bytes_before_load: int | None = None,
                              forward: Callable | None = None, export_dtype: Any = None,
                              model: Any = None, on_lowered: Callable[[], Any] | None = None) -> AheadResult:
    """Compile ``max`` calibration's computations for ``config`` + ``recipe`` from shapes alone.

    Args:
      config: the ``ModelConfig`` of the model that will be loaded.
      dtype: its parameter dtype.
      recipe: what ``apply_recipe`` accepts (a ``Recipe``, a name, a config dict).
      seq_len: tokens per calibration row.
      batch_size: rows per batch; None: ``auto_batch_size`` for ``n_rows`` rows, with the device memory
        that will be free once the weights are loaded: ``free_bytes_before_load`` (bytes free before
        loading started; None: what the device reports now) less the weights' bytes.
      forward: the calibration forward (default ``model(ids, mask)``).
      export_dtype: also compile the HF export's kernels for weights of this dtype (``warm_export_kernels``).
      model: ``abstract_model(config, dtype=dtype)`` built already, for this function alone (it is configured).
      on_lowered: called once the Python part is done (model configured, every computation traced and lowered;
        XLA may be compiling the first ones already); also when that part fails.

    Returns:
      An ``AheadResult``. Nothing is run and no weight memory is used; the executables wait in the
      store for the real model's calibration.
    """
    from flax import nnx

    from jaxquant.calibration.api import auto_batch_size
    from jaxquant.calibration.max import (
        calibration_step,
        default_forward,
        set_calibration_modes,
        weight_jobs,
        weight_parts,
    )
    from jaxquant.calibration.sites import quantizer_sites
    from jaxquant.models.decoder import abstract_model
    from jaxquant.models.walk import iter_variables
    from jaxquant.recipe import apply_recipe

    t0 = time.perf_counter()
    done = _Once(on_lowered)
    try:
        forward = forward or default_forward
        model = model if model is not None else abstract_model(config, dtype=dtype)
        apply_recipe(model, recipe, warn=False)
        sites = quantizer_sites(model)
        for s in sites:
            s.quantizer.set_mode("off")
        with weight_parts(model) as parts:
            jobs = weight_jobs(parts)
        if batch_size is None:
            free = free_bytes_before_load
            if free is not None:
                params = [v.get_value() for _, v in iter_variables(model, nnx.Param)]
                free -= sum(math.prod(x.shape) * jax.numpy.dtype(x.dtype).itemsize for x in params)
            batch_size = auto_batch_size(model, seq_len, n_rows, free_bytes=free)
        if set_calibration_modes(sites):
            jobs += calibration_step(model, forward).compile_jobs((batch_size, seq_len), True)
        n = len({id(e) for e in compile_all(jobs, on_lowered=done)})
    finally:
        done()
    if export_dtype is not None:
        from jaxquant.export.entries import warm_export_kernels

        n += warm_export_kernels(model, export_dtype)
    dt = time.perf_counter() - t0
    log.info("compiled %d calibration / export computation(s) ahead in %.2f s", n, dt)
    return AheadResult(n, dt, batch_size, model)


__all__ = ["AheadResult", "clear", "compile_all", "compile_calibration_ahead", "leaf_signature", "lookup", "store"]
