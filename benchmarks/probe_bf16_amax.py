"""Probe: how far bf16 calibration moves each activation amax from its float32 value, in transformers (torch, the
ModelOpt side) and in jaxquant, on the same model and tokens (CPU). Prints, per quantizer kind, the worst and
median relative difference of (jaxquant bf16 vs torch bf16), (torch bf16 vs fp32) and (jaxquant bf16 vs fp32),
where fp32 is torch's float32 amax (jaxquant's float32 amax equals it to 1e-6, tests/calibration; the probe prints
that check too). Writes JSON.

    python benchmarks/probe_bf16_amax.py --out benchmarks/results/probe_bf16_amax_smollm2_cpu.json
    python benchmarks/probe_bf16_amax.py --model gemma4 --out benchmarks/results/probe_bf16_amax_gemma4_cpu.json

``--model smollm2``: the real SmolLM2-135M on lee_news text. ``--model gemma4``: a random-weight Gemma-4-31B-shaped
text model scaled to ``--hidden`` (intermediate 4x, 5 sliding + 1 full layers, ``attention_k_eq_v``, tanh-GELU;
initialised like ``bench_e2e_vs_modelopt.py``: normal init, norms U(0.5, 1.5), ``layer_scalar`` 0.5 + U(0, 1), with
the init std scaled so projections have the 31B's output scale: 0.02 * sqrt(5376 / hidden)),
weights stored in bf16 so every run sees the same values, on random token ids with some left padding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "calibration"))


def smollm2_inputs(args):
    """(checkpoint dir, batches, label): SmolLM2-135M and lee_news rows."""
    import jax.numpy as jnp
    from assets import smollm2_hf_dir

    from jaxquant.converters import load_hf
    from jaxquant.data import builtin_texts, calib_batches

    d = smollm2_hf_dir()
    tok = load_hf(d, dtype=jnp.float32).tokenizer()
    batches = list(calib_batches(builtin_texts("lee_news"), tok, calib_size=args.rows, calib_seq=args.seq,
                                 batch_size=4))
    return d, batches, "SmolLM2-135M (offline asset), lee_news"


def gemma4_inputs(args, work: Path):
    """(checkpoint dir, batches, label): a random Gemma-4-31B-shaped model of width ``args.hidden``."""
    import numpy as np
    import torch
    import transformers
    from bench_e2e_vs_modelopt import SHAPES, shape_config

    h = args.hidden
    _, _, kw = shape_config(f"gemma4-31b:{args.layers}")
    assert SHAPES["gemma4-31b"][0] == "Gemma4TextConfig"
    kw.update(vocab_size=4096, hidden_size=h, intermediate_size=4 * h, num_attention_heads=8, num_key_value_heads=4,
              head_dim=h // 8, global_head_dim=h // 4, num_global_key_value_heads=1, sliding_window=args.seq // 4,
              max_position_embeddings=4096,
              initializer_range=args.init_std or 0.02 * (SHAPES["gemma4-31b"][2]["hidden_size"] / h) ** 0.5)
    torch.manual_seed(args.seed)
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**kw)).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight"):
                prm.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    model.to(torch.bfloat16).save_pretrained(str(work))
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(3, kw["vocab_size"], (args.rows, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    for i in range(0, args.rows, 2):  # every other row left-padded by up to a quarter
        k = int(rng.integers(1, args.seq // 4))
        mask[i, :k] = 0
        ids[i, :k] = 0
    batches = [(ids[i:i + 4], mask[i:i + 4]) for i in range(0, args.rows, 4)]
    return work, batches, (f"random Gemma-4-31B-shaped, hidden {h}, {args.layers} layers, init std "
                           f"{kw['initializer_range']:.4f}, seed {args.seed}, random ids")


def _per_op_bf16_activations() -> dict:
    """jaxquant's activations before they computed in float32: jax.nn applied to the bf16 array, rounding after
    each elementwise op (with its constants rounded to bf16), for the "before" column."""
    import jax

    gelu_tanh = lambda x: jax.nn.gelu(x, approximate=True)  # noqa: E731
    return {"silu": jax.nn.silu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu_fast": gelu_tanh,
            "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("smollm2", "gemma4"), default="smollm2")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="gemma4: hidden size")
    p.add_argument("--layers", type=int, default=6, help="gemma4: decoder layers")
    p.add_argument("--init-std", type=float, default=None,
                   help="gemma4: weight init std (default 0.02 * sqrt(5376 / hidden): the 31B width's projection scale)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="gemma4: one random model (and ids) per seed")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import jax.numpy as jnp
    import torch
    import transformers
    from test_calibration_torch_oracle import torch_reference

    from jaxquant.calibration import ahead, quantize
    from jaxquant.converters import load_hf
    from jaxquant.models import layers

    recipe = "general/ptq/fp8_default-kv_fp8"
    runs = {"torch_fp32": {}, "torch_bf16": {}, "jaxquant_fp32": {}, "jaxquant_bf16": {},
            "jaxquant_bf16_per_op_activations": {}}
    seeds = args.seeds if args.model == "gemma4" else [None]
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            if args.model == "gemma4":
                args.seed = seed
                d, batches, label = gemma4_inputs(args, Path(tmp))
            else:
                d, batches, label = smollm2_inputs(args)
            tag = "" if seed is None else f"seed{seed}/"
            for name, dt in (("torch_fp32", torch.float32), ("torch_bf16", torch.bfloat16)):
                m = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=dt,
                                                                      attn_implementation="eager").eval()
                ref = torch_reference(m, batches)
                runs[name].update({tag + k: v for k, v in ref.items()})
            for name, dt, acts in (("jaxquant_fp32", jnp.float32, None), ("jaxquant_bf16", jnp.bfloat16, None),
                                   ("jaxquant_bf16_per_op_activations", jnp.bfloat16, _per_op_bf16_activations())):
                saved = dict(layers.ACTIVATIONS)
                layers.ACTIVATIONS.update(acts or {})
                ahead.clear()  # stored stage executables are keyed by module structure and shapes, not the activation
                try:
                    r = quantize(load_hf(d, dtype=dt).model, recipe, batches, progress=False)
                finally:
                    layers.ACTIVATIONS.update(saved)
                runs[name].update({tag + k: float(r.calibration_state[k + "._amax"]) for k in ref})
    if len(seeds) > 1:
        label = label.replace(f"seed {seeds[-1]}", "seeds " + " ".join(map(str, seeds)))
    fp32 = runs["torch_fp32"]
    fp32_check = max(abs(runs["jaxquant_fp32"][k] - v) / v for k, v in fp32.items())
    print(f"{label}: jaxquant fp32 vs torch fp32 amax, max relative difference {fp32_check:.2e}")
    pairs = {"jaxquant_bf16_vs_torch_bf16": ("jaxquant_bf16", "torch_bf16"),
             "torch_bf16_vs_fp32": ("torch_bf16", "torch_fp32"),
             "jaxquant_bf16_vs_fp32": ("jaxquant_bf16", "torch_fp32"),
             "jaxquant_bf16_per_op_activations_vs_fp32": ("jaxquant_bf16_per_op_activations", "torch_fp32")}
    rows = {}
    for kind in ("q_proj", "o_proj", "gate_proj", "down_proj", "k_bmm", "v_bmm"):
        keys = [k for k in fp32 if f".{kind}" in k]
        rows[kind] = {"n": len(keys), **{c: [abs(runs[a][k] - runs[b][k]) / runs[b][k] for k in keys]
                                         for c, (a, b) in pairs.items()}}
    heads = ("jq bf16 vs torch bf16", "torch bf16 vs fp32", "jq bf16 vs fp32", "jq, bf16 act. vs fp32")
    print(f"{'quantizer':<10} " + " ".join(f"{h:>26}" for h in heads))
    print(f"{'':<10} " + " ".join(f"{'max / median / mean':>26}" for _ in heads))
    for kind, v in rows.items():
        cells = [f"{100 * max(v[c]):5.2f}% / {100 * statistics.median(v[c]):4.2f}% / {100 * statistics.mean(v[c]):4.2f}%"
                 for c in pairs]
        print(f"{kind:<10} " + " ".join(f"{c:>26}" for c in cells))
    ours = runs["jaxquant_bf16"]
    closer = sum(abs(ours[k] - fp32[k]) <= abs(runs["torch_bf16"][k] - fp32[k]) for k in fp32)
    print(f"jaxquant's bf16 amax is at least as close to fp32 as torch's bf16 amax for {closer} of {len(fp32)} "
          "quantizers")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/probe_bf16_amax.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "model": label, "rows": args.rows, "seq": args.seq,
            "jaxquant_fp32_vs_torch_fp32_max": fp32_check, "closer_or_equal": closer, "total": len(fp32),
            "per_kind": rows, "amax": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
