"""Calibration throughput against a plain forward of the same model (a script, not a test).

For each (batch, seq) it measures, after compilation and one warm-up, in tokens/s:

* ``fwd``: the original model's jitted forward to the logits (quantizers off);
* ``fwd_hidden``: the same without the LM head (the work calibration actually needs: its jitted step
  returns only the amax pytree, so XLA drops the head);
* ``calib``: ``run_calibration`` (jaxquant's per-batch jitted max-calibration step, with its lagged
  NaN check and the amax pytree donated from step to step);
* ``fakequant``: the calibrated model's forward to the logits in fake-quant mode (weights are re-quantized
  on every call today).

``overhead`` = ``fwd_hidden / calib - 1``: what calibration costs on top of the forward it needs (the number to
drive to zero). Prints a table and writes JSON (``--out``). Runs on whatever JAX backend is present (CPU by
default here; the same command on a GPU machine gives the GPU numbers).

    python benchmarks/bench_calibration.py                       # embedded SmolLM2-135M, fp8 recipe
    python benchmarks/bench_calibration.py --model DIR --recipe general/ptq/nvfp4_default-kv_fp8 \
        --batch-sizes 1,8 --seqs 512 --iters 8 --out bench.json
    python benchmarks/bench_calibration.py --tiny                # random 4-layer Llama, seconds
    python benchmarks/bench_calibration.py --config config.json  # any supported architecture, random weights
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 256,
        "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "tie_word_embeddings": True}


def load(args, dtype):
    from jaxquant.models import ModelConfig, build_model

    if args.tiny:
        return build_model(ModelConfig.from_hf_config(TINY), dtype=dtype, rngs=nnx.Rngs(0)), "tiny-llama (random)"
    if args.config:
        with open(args.config) as f:
            hf = json.load(f)
        model = build_model(ModelConfig.from_hf_config(hf), dtype=dtype, rngs=nnx.Rngs(0))
        return model, f"{args.config} (random weights: throughput does not depend on them)"
    from jaxquant.cli_ptq import load_model

    loaded, what = load_model(args.model, dtype)
    return loaded.model, what


def timed(fn, iters):
    fn()  # warm-up (compiled already)
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def forward_fn(model, head: bool):
    """A jitted forward taking the state as flat leaves (as the calibration step does: NNX state flattening
    costs milliseconds per call)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)

    @jax.jit
    def f(leaves, ids, mask):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        return m(ids, mask) if head else m.hidden_states(ids, mask)

    return lambda ids, mask: f(leaves, ids, mask)


def bench_one(model, sites, b, s, iters, vocab):
    from jaxquant.calibration.max import run_calibration, set_calibration_modes, set_quant_mode

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, vocab, (b, s)), jnp.int32)
    mask = jnp.ones((b, s), jnp.int32)
    tokens = b * s * iters
    row = {"batch": b, "seq": s, "iters": iters}

    set_quant_mode(sites, "off")
    for key, head in (("fwd", True), ("fwd_hidden", False)):
        f = forward_fn(model, head)
        t0 = time.perf_counter()
        jax.block_until_ready(f(ids, mask))
        row[f"{key}_compile_s"] = time.perf_counter() - t0
        row[f"{key}_tok_s"] = tokens / timed(lambda: f(ids, mask), iters)

    set_calibration_modes(sites)
    np_ids, np_mask = np.asarray(ids), np.asarray(mask)
    run_calibration(model, sites, [(np_ids, np_mask)], progress=False)  # compile + warm-up
    stats = run_calibration(model, sites, [(np_ids, np_mask)] * iters, progress=False)
    row["calib_compile_s"] = stats.compile_s
    row["calib_tok_s"] = stats.tokens / stats.run_s

    set_quant_mode(sites, "fake_quant")
    f = forward_fn(model, True)
    jax.block_until_ready(f(ids, mask))
    row["fakequant_tok_s"] = tokens / timed(lambda: f(ids, mask), iters)
    set_quant_mode(sites, "off")
    row["overhead_pct"] = 100.0 * (row["fwd_hidden_tok_s"] / row["calib_tok_s"] - 1.0)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--tiny", action="store_true", help="a random 4-layer Llama instead of a real model")
    p.add_argument("--config", default=None, help="an HF config.json: that architecture with random weights")
    p.add_argument("--recipe", default="general/ptq/fp8_default-kv_fp8")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on accelerators, f32 on CPU), bfloat16, float32")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--seqs", default="512")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from jaxquant.calibration.max import calibrate_weights
    from jaxquant.calibration.sites import quantizer_sites
    from jaxquant.cli_ptq import resolve_dtype_arg
    from jaxquant.recipe import apply_recipe

    dtype = resolve_dtype_arg(args.dtype)
    model, what = load(args, dtype)
    apply_recipe(model, args.recipe, warn=False)
    sites = quantizer_sites(model)
    calibrate_weights(sites, model)
    vocab = model.config.vocab_size
    dev = jax.devices()[0]
    meta = {"model": what, "recipe": args.recipe, "dtype": np.dtype(dtype).name, "backend": jax.default_backend(),
            "device": dev.device_kind, "jax": jax.__version__, "host": platform.node(),
            "cpu_count": __import__("os").cpu_count()}
    print(f"{what} | {args.recipe} | {meta['dtype']} | {meta['backend']} ({meta['device']})", flush=True)
    rows = []
    hdr = f"{'batch':>5} {'seq':>5} {'fwd tok/s':>11} {'fwd-hidden tok/s':>17} {'calib tok/s':>12} " \
          f"{'overhead':>9} {'fake-quant fwd tok/s':>21}"
    print(hdr)
    print("-" * len(hdr), flush=True)
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        for s in [int(x) for x in args.seqs.split(",")]:
            r = bench_one(model, sites, b, s, args.iters, vocab)
            rows.append(r)
            print(f"{b:>5} {s:>5} {r['fwd_tok_s']:>11,.0f} {r['fwd_hidden_tok_s']:>17,.0f} {r['calib_tok_s']:>12,.0f} "
                  f"{r['overhead_pct']:>8.1f}% {r['fakequant_tok_s']:>21,.0f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
