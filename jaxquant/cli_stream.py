"""``jaxquant ptq --layerwise --export-path DIR`` streamed: the model is never whole in device or host memory.

``run_ptq`` hands over here when ``streaming_plan`` says the run can stream (``calibration/streaming.py`` does the
work, ``export/streamed.py`` writes the export stage by stage). The export is byte for byte the one the
non-streamed path writes. What streams, what falls back to the non-streamed ``--layerwise`` path (with a note
saying why) and what is refused is in ``streaming_plan``'s docstring and docs/ptq.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from jaxquant.errors import UnsupportedError


def streaming_plan(args, recipe) -> tuple[bool, str | None]:
    """``(stream, note)`` for a ``jaxquant ptq`` run: whether it streams, and a line saying why not when it asked
    for layer-by-layer calibration but cannot stream.

    It streams when layer-by-layer calibration is asked for (``--layerwise`` or the recipe's
    ``algorithm.layerwise.enable``) with ``--export-path`` and ``--export-format hf``, unless ``--no-stream``.
    It falls back to the non-streamed layerwise path (the whole model in host memory) for: a recipe algorithm
    other than ``max``, ``--layerwise-checkpoint`` (or the recipe's ``checkpoint_dir``), ``--mesh``,
    ``--load-calib-state``, a GGUF model (or the embedded demo, a GGUF file).
    """
    from jaxquant.calibration.algorithms import resolve_algorithm
    from jaxquant.calibration.streaming import streaming_refusal

    algo, options = resolve_algorithm(recipe.algorithm)
    layerwise = bool(getattr(args, "layerwise", False) or options.get("layerwise")
                     or getattr(args, "layerwise_checkpoint", None))
    if not layerwise or getattr(args, "no_stream", False):
        return False, None
    if args.export_path is None or args.export_format != "hf":
        return False, ("note: not streaming (the parameters are loaded whole into host memory): streaming writes an "
                       "--export-format hf export stage by stage, and this run " +
                       ("exports nothing." if args.export_path is None else f"exports {args.export_format}."))
    why = streaming_refusal(algo.name if algo is not None else None, options)
    if why is None and getattr(args, "layerwise_checkpoint", None):
        why = "--layerwise-checkpoint is not implemented with streaming"
    if why is None and getattr(args, "mesh", None) is not None:
        why = "--mesh shards the whole model over the devices instead"
    if why is None and args.load_calib_state is not None:
        why = "--load-calib-state exports a model loaded whole"
    if why is None and (args.model is None or Path(args.model).suffix == ".gguf"):
        why = "a GGUF model is loaded whole (streaming reads safetensors)"
    if why is not None:
        return False, f"note: not streaming ({why}); the whole model is loaded into host memory."
    return True, None


def run_ptq_streamed(args, recipe, recipe_desc: str, timer, sizes: list[int], calib_size: str) -> int:
    """The streamed ``ptq`` run (module doc); ``run_ptq`` did the argument checks and built the recipe."""
    import jax

    from jaxquant.calibration import auto_batch_size, save_calibration_state
    from jaxquant.calibration.algorithms import resolve_algorithm
    from jaxquant.calibration.streaming import quantize_streamed
    from jaxquant.cli_ptq import (
        _calib_state_metadata,
        _check_quantizes_something,
        _out,
        calib_seq_for,
        parking_device,
        resolve_dtype_arg,
    )
    from jaxquant.converters.hf import open_hf
    from jaxquant.data import build_calib_batches, config_token_ids
    from jaxquant.export.streamed import StreamedExport
    from jaxquant.recipe import apply_recipe

    if args.eval_windows is not None and args.eval_windows > 0:
        raise UnsupportedError(
            f"--eval-windows {args.eval_windows}: perplexity needs the whole model, which a streamed --layerwise run "
            "never holds. Pass --eval-windows 0, evaluate the export afterwards (jaxquant eval --model "
            f"{args.export_path}), or pass --no-stream (the whole model in host memory).")
    t0 = time.perf_counter()
    dtype = resolve_dtype_arg(args.dtype)
    path = Path(args.model).expanduser()
    loaded, source = open_hf(path, dtype)
    model = loaded.model
    proc = getattr(args, "tokenizer_process", None)  # started by the command before its imports (jaxquant.tokenizer)
    if proc is not None:
        from jaxquant.tokenizer import tokenizer_via_process

        tokenizer = tokenizer_via_process(proc)
    else:
        tokenizer = loaded.tokenizer()
    timer.add("open model", time.perf_counter() - t0)
    c = loaded.config
    _out(f"model: {path} (streamed: each decoder layer is read when its stage runs; docs/scale.md)")
    _out(f"       {c.architecture}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, dtype {np.dtype(dtype).name}")
    calib_seq = calib_seq_for(args, model)

    t0 = time.perf_counter()
    resolution = apply_recipe(model, recipe, warn=False)
    _check_quantizes_something(resolution, recipe_desc, args.allow_unquantized)
    export = StreamedExport(loaded, Path(args.export_path), resolution=resolution, overwrite=args.overwrite,
                            allow_unquantized=args.allow_unquantized, progress=not args.quiet)
    timer.add("apply recipe + plan export", time.perf_counter() - t0)
    _out(f"recipe: {recipe_desc}: {recipe.description}")
    _out(resolution.report(show_disabled=False))
    _out()
    if args.eval_windows is None:
        _out("note: no perplexity: a streamed run never holds the whole model (jaxquant eval the export instead).")

    try:
        t0 = time.perf_counter()
        bs = args.batch_size or auto_batch_size(model, calib_seq, sum(sizes))
        special = config_token_ids(loaded.hf_config)
        batches = build_calib_batches(args.dataset, tokenizer, calib_size, calib_seq, bs, pack=args.pack,
                                      field=args.dataset_field, pad_id=special["pad_id"], eos_id=special["eos_id"],
                                      vocab_size=c.vocab_size)
        timer.add("load calibration data", time.perf_counter() - t0)
        _out(f"calibration data: {args.dataset or 'lee_news'} ({'packed' if args.pack else 'left-padded'}), "
             f"{batches.num_rows} samples x <= {calib_seq} tokens")
        _out(f"  {batches.num_batches} batches of {batches.batch_size} x {batches.seq_len}, "
             f"{batches.num_tokens} real tokens")
        _, options = resolve_algorithm(recipe.algorithm)
        park = parking_device()
        if park is not None:
            _out(f"--layerwise (streamed): embeddings and head in host memory, one decoder layer at a time on the "
                 f"{jax.devices()[0].device_kind}")
        result, summary = quantize_streamed(loaded, source, resolution, batches, dtype=dtype, export=export,
                                            progress=not args.quiet and sys.stderr.isatty(), park=park,
                                            options=options)
    except BaseException:
        export.cancel()
        raise
    t = result.timings
    for key, label in (("load", "read parameters"), ("weights", "calibrate: weights"), ("compile", "calibrate: compile"),
                       ("calibrate", "calibrate: forward passes"), ("finalize", "calibrate: finalize"),
                       ("export", "export (waits on the writer)")):
        timer.add(label, t.get(key, 0.0))
    _out(result.summary())
    if args.save_calib_state is not None:
        p = save_calibration_state(args.save_calib_state, result.calibration_state,
                                   _calib_state_metadata(args, recipe_desc, str(path), result.algorithm))
        _out(f"calibration state written to {p}")
    _out()
    _out(summary.describe())
    _out()
    _out("time per phase")
    _out(timer.table())
    return 0


__all__ = ["run_ptq_streamed", "streaming_plan"]
