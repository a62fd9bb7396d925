"""Work ``jaxquant ptq`` starts on threads while the checkpoint loads.

Loading a checkpoint is mostly waiting on the disk and the host-to-device link; two other slow
steps need nothing from the weights:

* the tokenizer (``AutoTokenizer`` imports a large part of transformers; on a machine with cores to spare it is
  served by a child process the command started first, ``jaxquant.tokenizer``), and
* XLA's compilation of the calibration computations (``calibration.ahead``: it needs the config,
  the recipe and the batch shape only), followed on the same thread by the export's kernels (needed only
  after the calibration, so they stay off the path to its first batch).

``start(...)`` starts them on daemon threads for a Hugging Face checkpoint directory and returns an
``Overlap`` whose ``tokenizer()`` / ``ahead()`` wait for them. Their exceptions surface when their
result is asked for, that is at the point where the command would have done the work itself, so
errors and their order do not change. Anything the threads cannot do (a GGUF file, a directory that
is not a loadable checkpoint) is left to the main thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("jaxquant")

#: Compile ahead on the CPU backend too (off: there the compilation competes with loading for the same
#: cores, and a missed guess at the batch shape would cost a second compilation).
COMPILE_AHEAD_ON_CPU = False
#: Start reading the weights only once the compile thread has traced and lowered the calibration (its Python part),
#: so that the loader's threads share the interpreter with XLA's compiler only, which releases it.
LOAD_AFTER_LOWERING = False


def spawn(name: str, fn, *args, **kwargs) -> cf.Future:
    """Run ``fn(*args, **kwargs)`` on a daemon thread; its result or exception lands in the returned future."""
    fut: cf.Future = cf.Future()

    def run():
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            fut.set_exception(e)

    threading.Thread(target=run, name=f"jaxquant-{name}", daemon=True).start()
    return fut


@dataclasses.dataclass
class Overlap:
    """Handles on the work started by ``start``."""

    tokenizer_future: cf.Future | None = None
    ahead_future: cf.Future | None = None
    export_future: cf.Future | None = None
    #: the checkpoint's abstract model, built once for both threads: this one for the loader, a clone for the
    #: compilation (two builds at once competed for the interpreter: ~0.9 s each for a 32-layer 8B model)
    abstract: Any = None
    #: set when the compile thread's Python part (recipe, tracing, lowering) is over, or it failed
    lowered: threading.Event | None = None

    def before_loading(self) -> None:
        """With ``LOAD_AFTER_LOWERING``: wait until the compile thread has lowered the calibration (if one runs)."""
        if LOAD_AFTER_LOWERING and self.lowered is not None:
            self.lowered.wait()

    def tokenizer(self, loaded) -> Any:
        """The tokenizer (from the thread when one was started, else loaded now)."""
        if self.tokenizer_future is None:
            return loaded.tokenizer()
        return self.tokenizer_future.result()

    def ahead(self):
        """The ``AheadResult`` of the compilation, or None (not started, or it failed: then the calibration
        compiles as usual)."""
        if self.ahead_future is None:
            return None
        try:
            return self.ahead_future.result()
        except Exception as e:  # noqa: BLE001 - an optimisation only; the calibration compiles itself
            log.warning("compiling the calibration ahead failed (%s: %s); it is compiled after loading instead.",
                        type(e).__name__, e)
            return None

    def export_kernels(self) -> None:
        """Wait until the export's kernels are compiled (if that was started; a failure there only means the export
        compiles them itself)."""
        if self.export_future is None:
            return
        try:
            self.export_future.result()
        except Exception as e:  # noqa: BLE001 - an optimisation only
            log.info("warming the export kernels failed (%s: %s); the export compiles them.", type(e).__name__, e)


def _compile_then_warm(ahead_f: cf.Future, export_f: cf.Future, export_dtype, *args, **kwargs) -> None:
    """The compile thread: the calibration's computations (result in ``ahead_f``), then the export kernels for
    weights of ``export_dtype`` (``export_f``; None: nothing to warm)."""
    from jaxquant.calibration.ahead import compile_calibration_ahead

    try:
        r = compile_calibration_ahead(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
        ahead_f.set_exception(e)  # (compile_calibration_ahead has called on_lowered: the loader is not left waiting)
        export_f.set_result(0)
        return
    ahead_f.set_result(r)
    if export_dtype is None:
        export_f.set_result(0)
        return
    try:
        from jaxquant.export.entries import warm_export_kernels

        export_f.set_result(warm_export_kernels(r.model, export_dtype))
    except BaseException as e:  # noqa: BLE001
        export_f.set_exception(e)


def _checkpoint_config(model_arg: str | None):
    """The ``ModelConfig`` of an HF checkpoint directory, or None (anything the main thread should report)."""
    if model_arg is None:
        return None
    d = Path(model_arg).expanduser()
    if not d.is_dir() or not (d / "config.json").is_file() or (d / "hf_quant_config.json").is_file():
        return None
    try:
        from jaxquant.converters.hf import read_hf_config
        from jaxquant.models.config import ModelConfig

        hf = read_hf_config(d)
        if "quantization_config" in hf:
            return None
        return ModelConfig.from_hf_config(hf, source=str(d / "config.json"))
    except Exception:  # noqa: BLE001 - load_model reports it
        return None


def _stored_dtype(d: Path):
    """The numpy dtype of the checkpoint's first tensor (what the export writes its weights in), or None."""
    try:
        from jaxquant.io.safetensors import DTYPES, CheckpointFiles

        files = CheckpointFiles.open(d)
        return DTYPES.get(files.tensor_info(files.keys()[0]).dtype)
    except Exception:  # noqa: BLE001 - load_model reports a broken checkpoint
        return None


def start(args, dtype, recipe, n_rows: int, default_calib_seq: int, *, compile_ahead: bool = True) -> Overlap:
    """Start the tokenizer and (on an accelerator, when calibrating, unless ``compile_ahead`` is False) the
    ahead-of-time compilation for ``args.model``. Returns at once."""
    import jax

    config = _checkpoint_config(args.model)
    if config is None:
        return Overlap()
    proc = getattr(args, "tokenizer_process", None)
    if proc is not None:  # started by the command before its imports (jaxquant.tokenizer)
        from jaxquant.tokenizer import tokenizer_via_process

        out = Overlap(tokenizer_future=spawn("tokenizer", tokenizer_via_process, proc))
    else:
        from jaxquant.converters.hf import load_tokenizer

        out = Overlap(tokenizer_future=spawn("tokenizer", load_tokenizer, Path(args.model).expanduser()))
    if (not compile_ahead or args.load_calib_state is not None
            or (jax.default_backend() == "cpu" and not COMPILE_AHEAD_ON_CPU)):
        return out
    limit = config.max_position_embeddings
    if args.calib_seq is not None and (args.calib_seq <= 0 or (limit is not None and args.calib_seq > limit)):
        return out  # the main thread refuses it (DataError) before any calibration
    seq = args.calib_seq or (default_calib_seq if limit is None else min(default_calib_seq, limit))
    from jaxquant.calibration.api import free_device_bytes

    export_dtype = None
    if args.export_path is not None and args.export_format in ("hf", "both"):
        export_dtype = _stored_dtype(Path(args.model).expanduser())
    from flax import nnx

    from jaxquant.models.decoder import abstract_model

    out.abstract = abstract_model(config, dtype=dtype)
    out.ahead_future, out.export_future, out.lowered = cf.Future(), cf.Future(), threading.Event()
    spawn("compile", _compile_then_warm, out.ahead_future, out.export_future, export_dtype, config, dtype, recipe, seq,
          args.batch_size or None, n_rows=n_rows,
          free_bytes_before_load=None if args.batch_size else free_device_bytes(), model=nnx.clone(out.abstract),
          on_lowered=out.lowered.set)
    return out


__all__ = ["COMPILE_AHEAD_ON_CPU", "LOAD_AFTER_LOWERING", "Overlap", "spawn", "start"]
