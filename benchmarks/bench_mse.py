"""``max`` vs ``mse`` calibration on one real model: held-out perplexity of NVFP4 recipes that differ only in the
algorithm (a script, not a test).

Pairs (each calibrated on the same ``lee_news`` batches, evaluated on the held-out Wikipedia windows ``jaxquant
ptq`` uses, KV cache as the recipe says):

* ``general/ptq/nvfp4_mlp_only-kv_fp8_cast`` (max, dynamic NVFP4 weights) vs ModelOpt's
  ``general/ptq/nvfp4_mlp_only_mse-kv_fp8_cast`` (mse with the FP8 scale sweep, static NVFP4 weights);
* ``--qformat nvfp4`` vs ``--qformat nvfp4_w4a4_weight_mse_fp8_sweep`` (all linears W4A4; no KV quantization);
* NVFP4 W4A16 (static weights only) with max vs with mse (sweep), the weights' error alone.

    python benchmarks/bench_mse.py --calib-size 16 --eval-windows 4 --out benchmarks/results/bench_mse_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

W4A16_STATIC = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                              {"quantizer_name": "*weight_quantizer",
                               "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static",
                                                                           "scale_bits": "e4m3"}}},
                              {"quantizer_name": "*lm_head*", "enable": False}]}


def pairs():
    """``[(label, recipe with max, recipe with mse)]``."""
    from jaxquant.recipe import preset_recipe

    return [
        ("nvfp4_mlp_only (kv fp8_cast)", "general/ptq/nvfp4_mlp_only-kv_fp8_cast",
         "general/ptq/nvfp4_mlp_only_mse-kv_fp8_cast"),
        ("nvfp4 W4A4 all linears", preset_recipe("nvfp4", "none"),
         preset_recipe("nvfp4_w4a4_weight_mse_fp8_sweep", "none")),
        ("nvfp4 W4A16 static weights", {**W4A16_STATIC, "algorithm": "max"},
         {**W4A16_STATIC, "algorithm": {"method": "mse", "fp8_scale_sweep": True}}),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a local HF checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--calib-seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seq", type=int, default=512)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxquant.calibration import quantize, set_quant_mode
    from jaxquant.cli_ptq import load_model, perplexity_of
    from jaxquant.data import build_calib_batches, config_token_ids, load_eval_text
    from jaxquant.eval import eval_windows

    loaded, desc = load_model(args.model, jnp.float32)
    model, tok = loaded.model, loaded.tokenizer()
    special = config_token_ids(loaded.hf_config)
    windows = eval_windows(tok, load_eval_text(None), seq_len=args.eval_seq, n_windows=args.eval_windows,
                           bos_id=special["bos_id"], vocab_size=loaded.config.vocab_size)
    batches = build_calib_batches(None, tok, str(args.calib_size), args.calib_seq, args.batch_size,
                                  pad_id=special["pad_id"], eos_id=special["eos_id"],
                                  vocab_size=loaded.config.vocab_size)
    set_quant_mode(model, "off")
    base, _ = perplexity_of(model, windows, 4)
    print(f"{desc}: baseline perplexity {base.ppl:.3f} ({base.n_tokens} tokens)", flush=True)
    rows = []
    for label, *recipes in pairs():
        row = {"pair": label}
        for algo, recipe in zip(("max", "mse"), recipes):
            t0 = time.perf_counter()
            res = quantize(model, recipe, batches, progress=False)
            ppl, _ = perplexity_of(model, windows, 4)
            row[algo] = {"ppl": ppl.ppl, "change_pct": 100 * (ppl.ppl / base.ppl - 1),
                         "search_s": res.timings.get("search", 0.0), "seconds": time.perf_counter() - t0}
            print(f"{label:<30} {algo}: ppl {ppl.ppl:8.3f} ({row[algo]['change_pct']:+.1f}%)  "
                  f"search {row[algo]['search_s']:.0f} s, {row[algo]['seconds']:.0f} s", flush=True)
        rows.append(row)
    print()
    print(f"| recipe | max | mse | (baseline {base.ppl:.3f}) |")
    print("|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['max']['ppl']:.3f} ({r['max']['change_pct']:+.1f}%) | "
              f"{r['mse']['ppl']:.3f} ({r['mse']['change_pct']:+.1f}%) | |")
    if args.out:
        report = {"command": "python benchmarks/bench_mse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "model": desc, "backend": jax.default_backend(), "machine": platform.platform(),
                  "calib": {"dataset": "lee_news", "size": args.calib_size, "seq": args.calib_seq},
                  "eval": {"dataset": "wikipedia (held-out)", "windows": args.eval_windows, "seq": args.eval_seq,
                           "tokens": base.n_tokens},
                  "baseline_ppl": base.ppl, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
