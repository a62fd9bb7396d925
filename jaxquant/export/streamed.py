"""An HF export written stage by stage while a streamed layerwise calibration runs (``calibration/streaming.py``).

The model is never whole: each decoder layer's parameters exist only while its stage runs. The export is still
the one ``export_hf`` writes, byte for byte, because it is made of the same pieces:

1. ``StreamedExport(loaded, dir)`` plans the whole export's layout from the configured, not yet calibrated,
   abstract model (``plan_export(activations=False, calibrated=False)``: names, shapes and dtypes are fixed by the
   shapes and the recipe, so every shard's header and every tensor's offset are known before any value) and starts
   ``write_export`` on a thread, with every entry's ``produce`` replaced by a wait for that tensor's stage.
2. ``publish(include)`` after a stage is calibrated (its parameters on the device, its amax final) plans that
   stage's tensors with ``plan_entries(include=...)`` (the same entries and the same format kernels as a whole-model
   export) and hands them to the writer thread, which produces them (the export kernels run on the device) and
   writes them at their planned offsets. ``publish`` returns once every tensor of the stage is produced and its
   finiteness checks have passed: the caller may then drop the stage's parameters.
3. The activation-dependent tensors (``input_scale``, ``k_scale``, ``v_scale``: a few bytes each) are kept as numpy
   scalars and written last, as ``export.early`` does (``write_export``'s ``final_plan``).
4. ``finish()`` once every stage is published: the late tensors, ``hf_quant_config.json``, ``config.json``, the
   amax sidecar, validation and the atomic publish. ``cancel()`` after a failure removes the partial export.

The writer produces the tensors in the export's (sorted) order. The decoder layers sort in layer order, so it waits
for layer 0, then layer 1, ...; the embeddings, final norm and head (the "shell") are published before the first
layer and stay loaded until the end, wherever their names sort.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxquant.errors import ExportError, JaxquantError
from jaxquant.export.entries import DeferredChecks, plan_entries
from jaxquant.export.hf import ExportSummary, plan_export, write_export
from jaxquant.export.linears import hf_order_key
from jaxquant.export.shards import Entry, same_inputs


class StreamedExportCancelled(JaxquantError):
    """The streamed export was cancelled (its calibration failed); nothing was published."""


def _whole_model_order(amax: dict[str, float]) -> dict[str, float]:
    """The amax sidecar's keys in the order a whole-model ``plan_entries`` writes them: the linears' quantizers in
    transformers' module order (``hf_order_key``), then the KV quantizers in layer order (as the stages came)."""
    kv = [k for k in amax if k.endswith(("k_bmm_quantizer", "v_bmm_quantizer"))]
    linear = sorted((k for k in amax if k not in set(kv)), key=lambda k: hf_order_key(k.rsplit(".", 1)[0]))
    return {k: amax[k] for k in linear + kv}


class _AllChecks:
    """The ``DeferredChecks`` of the stages published without waiting, finished together before the publish."""

    def __init__(self, checks: list[DeferredChecks]):
        self.checks = checks

    def finish(self) -> None:
        for c in self.checks:
            c.finish()


class StreamedExport:
    """``export_hf(loaded, export_dir, **kwargs)`` written stage by stage (module doc).

    ``loaded``: a ``LoadedModel`` whose model is configured (recipe applied); its parameters may be abstract
    (``ShapeDtypeStruct``) except those of the stage being published. ``kwargs``: ``export_hf``'s planning options
    (``max_shard_size``, ``overwrite``, ``dtype``, ``allow_unquantized``). The constructor raises what
    ``export_hf``'s validation raises; write errors surface from ``publish`` or ``finish``.
    """

    def __init__(self, loaded: Any, export_dir, *, progress: bool = False, **kwargs: Any):
        self._loaded, self._dir, self._kwargs = loaded, export_dir, kwargs
        layout = plan_export(loaded, export_dir, activations=False, calibrated=False, **kwargs)
        self._layout = layout
        self._planned = {e.name: e for e in layout.entries}
        self._cond = threading.Condition()
        self._ready: dict[str, Entry] = {}  # published, not yet produced (non-late)
        self._producing: set[str] = set()  # taken by the writer, produce() not returned yet
        self._late: dict[str, Entry] = {}  # final late entries (numpy values)
        self._amax: dict[str, float] = {}
        self._deferred: list[DeferredChecks] = []  # checks of stages published without waiting
        self._inputs: dict[str, tuple] = {}  # statistics each written tensor was computed from (Entry.inputs)
        self._done = False
        self._cancelled = False
        self._result: list = []
        layout.entries = [dataclasses.replace(e, produce=self._waiter(e.name)) for e in layout.entries]
        self._thread = threading.Thread(target=self._write, args=(layout, progress), name="jaxquant-streamed-export")
        self._thread.start()

    # ------------------------------------------------------------------ writer thread
    def _write(self, plan, progress) -> None:
        try:
            self._result.append(write_export(plan, progress=progress, final_plan=self._final_plan))
        except BaseException as e:  # noqa: BLE001 - re-raised by publish() / finish()
            self._result.append(e)
        with self._cond:
            self._cond.notify_all()

    def _waiter(self, name: str) -> Callable[[], Any]:
        def produce():
            with self._cond:
                while name not in self._ready:
                    if self._cancelled:
                        raise StreamedExportCancelled(f"export to {self._dir} cancelled: the calibration did not "
                                                      "finish")
                    if self._done:
                        raise ExportError(f"internal error: tensor {name!r} was planned for the streamed export but "
                                          "no stage produced it")
                    self._cond.wait()
                entry = self._ready.pop(name)
                self._producing.add(name)
            try:
                return entry.produce()
            finally:
                with self._cond:
                    self._producing.discard(name)
                    self._cond.notify_all()

        return produce

    def _final_plan(self):
        with self._cond:
            while not (self._done or self._cancelled):
                self._cond.wait()
            if self._cancelled:
                raise StreamedExportCancelled(f"export to {self._dir} cancelled: the calibration did not finish")
        missing = [e.name for e in self._layout.entries if e.late and e.name not in self._late]
        if missing:
            raise ExportError(f"internal error: the streamed export has no value for {missing[0]!r}")
        entries = [self._late[e.name] if e.late else e for e in self._layout.entries]
        return dataclasses.replace(self._layout, entries=entries, amax=_whole_model_order(self._amax),
                                   checks=_AllChecks(self._deferred))

    def _raise_if_failed(self) -> None:
        if self._result and isinstance(self._result[0], BaseException):
            raise self._result[0]

    # ------------------------------------------------------------------ caller side
    def publish(self, include: Callable[[str], bool], *, activations: bool = True, refresh: bool = False,
                wait: bool = True) -> None:
        """Plan and hand over the tensors whose (canonical HF) names ``include`` accepts, from the model as it is
        now; returns when all of them are produced (on the device) and checked finite. ``wait`` False: return at
        once (their parameters stay alive until ``finish``; e.g. the shell, whose final norm sorts after the
        layers), and check them before the export is published.

        ``activations`` False: the stage's activation statistics do not exist yet (the shell before its head
        stage); its late tensors come from a later ``publish(..., refresh=True)``, which must find every other
        tensor of the stage unchanged (``Entry.inputs``) and hands over only the late ones.
        """
        checks = DeferredChecks()
        amax: dict[str, float] = {}
        entries, _, _ = plan_entries(self._loaded, dtype=self._kwargs.get("dtype"), amax_out=amax, checks=checks,
                                     activations=activations, include=include)
        fresh: dict[str, Entry] = {}
        for e in entries:
            planned = self._planned.get(e.name)
            if planned is None or tuple(planned.shape) != tuple(e.shape) or np.dtype(planned.dtype) != np.dtype(e.dtype):
                raise ExportError(f"internal error: the streamed export planned {e.name!r} differently from the "
                                  "stage that produced it; export without streaming (--no-stream).")
            if e.late:
                if activations:
                    self._late[e.name] = dataclasses.replace(e, produce=(lambda a=np.asarray(e.produce()): a))
            elif refresh:
                old = self._inputs.get(e.name)
                if old is None or not same_inputs(dataclasses.replace(e, inputs=old), e):
                    raise ExportError(f"internal error: {e.name!r} changed after it was written by the streamed "
                                      "export; export without streaming (--no-stream).")
            else:
                fresh[e.name] = e
        self._inputs.update({n: e.inputs for n, e in fresh.items()})
        self._amax.update(amax)
        with self._cond:
            self._raise_if_failed()
            self._ready.update(fresh)
            self._cond.notify_all()
            if not wait:
                self._deferred.append(checks)
                return
            while any(n in self._ready or n in self._producing for n in fresh) and not self._result:
                self._cond.wait()
        self._raise_if_failed()
        checks.finish()  # NaN / Inf in a quantized weight: NonFiniteError now, before the stage is dropped

    def finish(self) -> ExportSummary:
        """Write the late tensors and the JSON files, validate and publish (every stage published); the
        ``ExportSummary``."""
        with self._cond:
            self._done = True
            self._cond.notify_all()
        self._thread.join()
        self._raise_if_failed()
        return self._result[0]

    def cancel(self) -> None:
        """Stop and remove the partial export (after a failed calibration); returns when the thread has exited."""
        if self._result and not isinstance(self._result[0], BaseException) and self._done:
            return
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        self._thread.join()


__all__ = ["StreamedExport", "StreamedExportCancelled"]
