"""An HF export that writes the weights while the calibration forward passes still run.

Of everything ``export_hf`` writes, only the input / KV scales (``input_scale``, ``k_scale``, ``v_scale``, a few
bytes per layer) depend on the activations; the quantized weights and their scales depend on the weights and
their amax, which ``max`` calibration fixes before its first forward pass. So ``jaxquant ptq`` starts the export
there (``quantize(on_weights_calibrated=...)``):

1. ``EarlyExport(loaded, dir, ...)`` starts a thread that plans the export with the weights' amax
   (``plan_export(activations=False)``: the activation scales are ``late`` placeholders; the same validation as
   ``export_hf``) and writes every other tensor into the atomic temporary directory while the caller calibrates.
   The caller's forward passes do not wait for the plan (it reads a copy of the quantizer statistics, which the
   calibration step donates from call to call); a validation error surfaces from ``finish()``.
2. ``finish()`` after the calibration plans the export again from the final model, on the calling thread while
   the writer may still be finishing its first pass, and the writer then puts the late tensors at their planned
   offsets, plus any tensor whose weight statistics changed in between (``finalize`` can raise a fused sibling's
   or an expert's weight amax): the files are byte for byte what ``export_hf`` writes after the calibration
   (tests/export/test_export_early.py). Then the usual checks, validation and atomic publish.
3. ``cancel()`` when the calibration fails: the thread stops and the temporary directory is removed.

Only for calibrations that leave the weights alone (``max``): an algorithm that changes weights must export after.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.errors import JaxquantError
from jaxquant.export.checks import is_loaded
from jaxquant.export.hf import ExportSummary, plan_export, write_export


def _with_own_statistics(model_or_loaded):
    """The model (or ``LoadedModel``) as a new module tree over the same parameter arrays with copies of the quantizer
    statistics: the writer thread plans from it while the calibration step donates (deletes) the model's own
    statistic arrays from call to call."""
    from flax import nnx

    from jaxquant.quantizer.tensor_quantizer import QuantAmax, QuantGlobalAmax

    loaded = model_or_loaded if is_loaded(model_or_loaded) else None
    model = loaded.model if loaded is not None else model_or_loaded
    graphdef, stats, rest = nnx.split(model, (QuantAmax, QuantGlobalAmax), ...)
    clone = nnx.merge(graphdef, jax.tree.map(jnp.copy, stats), rest)
    return dataclasses.replace(loaded, model=clone) if loaded is not None else clone


class ExportCancelled(JaxquantError):
    """The early export was cancelled (its calibration failed); nothing was published."""


class EarlyExport:
    """``export_hf(loaded, export_dir, **kwargs)`` started before the activations are calibrated (module doc).

    Validation and write errors surface from ``finish()``.
    """

    def __init__(self, loaded: Any, export_dir, **kwargs: Any):
        self._loaded, self._dir, self._kwargs = loaded, export_dir, kwargs
        self._snapshot = _with_own_statistics(loaded)
        self._calibrated = threading.Event()
        self._cancelled = False
        self._final: list = []  # the plan of the calibrated model (or the exception planning it raised)
        self._result: list = []
        # not a daemon thread, and joined by finish() / cancel(): a thread still releasing device arrays while the
        # interpreter shuts down aborts the process (seen on a GPU: "FATAL: exception not rethrown")
        self._thread = threading.Thread(target=self._write, name="jaxquant-early-export")
        self._thread.start()

    def _write(self) -> None:
        try:
            plan = plan_export(self._snapshot, self._dir, activations=False, **self._kwargs)
            self._snapshot = None
            plan.entries = [dataclasses.replace(e, produce=self._unless_cancelled(e.produce)) for e in plan.entries]
            self._result.append(write_export(plan, final_plan=self._final_plan))
        except BaseException as e:  # noqa: BLE001 - re-raised by finish()
            self._result.append(e)

    def _unless_cancelled(self, produce):
        def guarded():
            if self._cancelled:
                raise ExportCancelled(f"export to {self._dir} cancelled: the calibration did not finish")
            return produce()

        return guarded

    def _final_plan(self):
        self._calibrated.wait()
        if self._cancelled:
            raise ExportCancelled(f"export to {self._dir} cancelled: the calibration did not finish")
        if isinstance(self._final[0], BaseException):
            raise self._final[0]
        return self._final[0]

    def finish(self) -> ExportSummary:
        """Write the activation scales of the now calibrated model, validate and publish; the ``ExportSummary``."""
        if not self._result:  # still writing: plan the late tensors here meanwhile
            try:
                self._final.append(plan_export(self._loaded, self._dir, **self._kwargs))
            except BaseException as e:  # noqa: BLE001 - raised on the writer thread, which then cleans up
                self._final.append(e)
        self._calibrated.set()
        self._thread.join()
        r = self._result[0]
        if isinstance(r, BaseException):
            raise r
        return r

    def cancel(self) -> None:
        """Stop and remove the partial export (after a failed calibration); returns when the thread has exited."""
        if self._result:
            return
        self._cancelled = True
        self._calibrated.set()
        self._thread.join()


__all__ = ["EarlyExport", "ExportCancelled"]
