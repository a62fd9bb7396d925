"""Every export format on one real model: bits per parameter of the checkpoint, perplexity with max calibration,
which engines load it (a script, not a test).

For each hf_ptq ``--qformat`` preset jaxquant ships (KV cache unquantized, so the numbers are the weights' and
activations'), on the embedded SmolLM2-135M-Instruct (or ``--model DIR``): calibrate with ``max`` on the built-in
``lee_news`` text, evaluate the fake-quantized model's perplexity on the held-out Wikipedia articles (the windows
``jaxquant ptq`` uses), export, and read the bits per parameter of the written safetensors (every tensor, scales
included, over the logical parameter count; unquantized tensors in ``--export-dtype``, bf16 by default). Prints a
table and writes JSON (``--out``).

    python benchmarks/bench_formats.py --out benchmarks/results/bench_formats_smollm2_cpu.json
    python benchmarks/bench_formats.py --formats fp8,mxfp8 --calib-size 32 --eval-windows 2   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

#: quant_algo -> who serves it (vLLM: ``ModelOptFp8Config`` & co, QUANT_ALGOS in its modelopt.py; TensorRT-LLM:
#: its ModelOpt loader; spec anchors_2026-12.md §6) and the GPUs that run it natively.
ENGINES = {
    "FP8": ("vLLM, TensorRT-LLM, SGLang", "Ada, Hopper, Blackwell"),
    "FP8_PER_CHANNEL_PER_TOKEN": ("vLLM, TensorRT-LLM", "Ada, Hopper, Blackwell"),
    "FP8_PB_WO": ("vLLM", "Ada, Hopper, Blackwell"),
    "NVFP4": ("vLLM, TensorRT-LLM, SGLang", "Blackwell (vLLM: W4A16 Marlin fallback from Turing)"),
    "W4A16_NVFP4": ("vLLM, TensorRT-LLM", "Blackwell; vLLM Marlin from Turing"),
    "MXFP8": ("vLLM, TensorRT-LLM", "vLLM from Ampere (compute 8.0); native MX on Blackwell"),
    "W8A16": ("TensorRT-LLM", "Ampere and newer"),
    "W4A16_AWQ": ("TensorRT-LLM", "Ampere and newer"),
    "W4A8_NVFP4_FP8": ("TensorRT-LLM", "Blackwell"),
    "W4A8_MXFP4_FP8": ("TensorRT-LLM", "Blackwell"),
    "W8A8_SQ_PER_CHANNEL": ("TensorRT-LLM", "Ampere and newer"),
    "MXFP4": ("none known (ModelOpt writes lower-case 'mxfp4')", ""),
    "MIXED_PRECISION": ("vLLM (FP8 / NVFP4 layers), TensorRT-LLM", "as its formats"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a local HF checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--formats", default=None, help="comma list of --qformat presets (default: every one shipped)")
    p.add_argument("--append", action="store_true", help="merge these rows into the existing --out report (same "
                   "model and settings assumed) instead of replacing it")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--calib-seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seq", type=int, default=512)
    p.add_argument("--export-dtype", default="bfloat16",
                   help="dtype of the unquantized tensors in the checkpoint (and of ModelOpt's export arithmetic); "
                        "bf16 as a real checkpoint ships (the embedded model loads in float32 from its GGUF)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxquant._version import __version__
    from jaxquant.calibration import quantize, set_quant_mode
    from jaxquant.cli_ptq import load_model, perplexity_of
    from jaxquant.data import build_calib_batches, config_token_ids, load_eval_text
    from jaxquant.eval import eval_windows
    from jaxquant.errors import JaxquantError
    from jaxquant.export import export_hf
    from jaxquant.recipe import preset_recipe, qformat_choices

    names = args.formats.split(",") if args.formats else list(qformat_choices())
    loaded, desc = load_model(args.model, jnp.float32)
    model = loaded.model
    tok = loaded.tokenizer()
    special = config_token_ids(loaded.hf_config)
    windows = eval_windows(tok, load_eval_text(None), seq_len=args.eval_seq, n_windows=args.eval_windows,
                           bos_id=special["bos_id"], vocab_size=loaded.config.vocab_size)
    batches = build_calib_batches(None, tok, str(args.calib_size), args.calib_seq, args.batch_size,
                                  pad_id=special["pad_id"], eos_id=special["eos_id"], vocab_size=loaded.config.vocab_size)
    set_quant_mode(model, "off")
    base, _ = perplexity_of(model, windows, 4)
    rows = [{"qformat": "bf16 / fp32 baseline", "quant_algo": None, "bits_per_param": None, "ppl": base.ppl}]
    print(f"{desc}: baseline perplexity {base.ppl:.3f} ({base.n_tokens} tokens)", flush=True)
    for name in names:
        t0 = time.perf_counter()
        recipe = preset_recipe(name, "none")
        if recipe.algorithm is None and any(e.cfg is not None and e.effective_enable and not isinstance(e.cfg, tuple)
                                            and "input" in e.quantizer_name and e.cfg.needs_calibration
                                            for e in recipe.quant_cfg):
            recipe = dataclasses.replace(recipe, algorithm="max")  # static activations: hf_ptq's default KV makes it max
        res = quantize(model, recipe, batches, progress=False)
        if not res.resolution.enabled:
            print(f"{name:<30} quantizes nothing in this model (no matching modules)", flush=True)
            rows.append({"qformat": name, "quant_algo": None, "bits_per_param": None, "ppl": None,
                         "note": "quantizes nothing in this model"})
            continue
        ppl, _ = perplexity_of(model, windows, 4)
        try:
            with tempfile.TemporaryDirectory() as d:
                summary = export_hf(loaded, Path(d) / "out", resolution=res, dtype=jnp.dtype(args.export_dtype))
        except JaxquantError as e:  # e.g. INT4 blocks of 128 on a model whose widths are not multiples of 128
            note = f"not exportable on this model: {str(e).splitlines()[0][:160]}"
            print(f"{name:<30} ppl {ppl.ppl:8.3f} (fake quant); {note}", flush=True)
            rows.append({"qformat": name, "quant_algo": None, "bits_per_param": None, "ppl": ppl.ppl,
                         "ppl_change_pct": 100 * (ppl.ppl / base.ppl - 1), "note": note,
                         "seconds": time.perf_counter() - t0})
            continue
        algo = summary.hf_quant_config["quantization"]["quant_algo"]
        rows.append({"qformat": name, "quant_algo": algo, "bits_per_param": round(summary.bits_per_param, 3),
                     "ppl": ppl.ppl, "ppl_change_pct": 100 * (ppl.ppl / base.ppl - 1),
                     "engines": ENGINES.get(str(algo).upper(), ("?", "?"))[0],
                     "gpus": ENGINES.get(str(algo).upper(), ("?", "?"))[1], "seconds": time.perf_counter() - t0})
        r = rows[-1]
        print(f"{name:<30} {algo:<26} {r['bits_per_param']:>6.2f} bits/param  ppl {ppl.ppl:8.3f} "
              f"({r['ppl_change_pct']:+.1f}%)  {r['seconds']:.0f} s", flush=True)
    print()
    print("| --qformat | quant_algo | bits/param | perplexity | change | served by | GPUs |")
    print("|---|---|---:|---:|---:|---|---|")
    for r in rows:
        bits = "" if r["bits_per_param"] is None else f"{r['bits_per_param']:.2f}"
        change = "" if r["quant_algo"] is None else f"{r['ppl_change_pct']:+.1f}%"
        ppl_cell = f"{r['ppl']:.3f}" if r["ppl"] is not None else r.get("note", "")
        if r["ppl"] is not None and r.get("note"):
            ppl_cell += f" (fake quant; {r['note']})"
            change = f"{r['ppl_change_pct']:+.1f}%"
        print(f"| {r['qformat']} | {r['quant_algo'] or ''} | {bits} | {ppl_cell} | {change} | "
              f"{r.get('engines', '')} | {r.get('gpus', '')} |")
    if args.out and args.append and Path(args.out).is_file():  # replace / add these rows in an earlier report
        report = json.loads(Path(args.out).read_text())
        mine = {r["qformat"] for r in rows[1:]}
        report["rows"] = [r for r in report["rows"] if r["qformat"] not in mine] + rows[1:]
        report.setdefault("appended", []).append(
            {"command": "python benchmarks/bench_formats.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "jaxquant": __version__, "rows": sorted(mine)})
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    elif args.out:
        report = {"command": "python benchmarks/bench_formats.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "model": desc, "export_dtype": args.export_dtype, "jaxquant": __version__, "backend": jax.default_backend(),
                  "machine": platform.platform(), "calib": {"dataset": "lee_news", "size": args.calib_size,
                                                            "seq": args.calib_seq, "algorithm": "max"},
                  "eval": {"dataset": "wikipedia (held-out)", "windows": args.eval_windows, "seq": args.eval_seq,
                           "tokens": base.n_tokens},
                  "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
