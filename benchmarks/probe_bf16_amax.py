"""Probe: how far bf16 calibration moves each activation amax from its float32 value, in transformers (torch, the
ModelOpt side) and in jaxquant, on the same real model and tokens (CPU). Prints, per quantizer kind, the worst and
median relative difference of (jaxquant bf16 vs torch bf16), (torch bf16 vs fp32) and (jaxquant bf16 vs fp32),
where fp32 is torch's float32 amax (jaxquant's float32 amax equals it to 1e-6, tests/calibration). Writes JSON.

    python benchmarks/probe_bf16_amax.py --out benchmarks/results/probe_bf16_amax_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "calibration"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import torch
    import transformers
    from assets import smollm2_hf_dir
    from test_calibration_torch_oracle import torch_reference

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.data import builtin_texts, calib_batches

    d = smollm2_hf_dir()
    loaded32 = load_hf(d, dtype=jnp.float32)
    tok = loaded32.tokenizer()
    batches = list(calib_batches(builtin_texts("lee_news"), tok, calib_size=args.rows, calib_seq=args.seq,
                                 batch_size=4))
    ref = {}
    for name, dt in (("torch_fp32", torch.float32), ("torch_bf16", torch.bfloat16)):
        m = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=dt, attn_implementation="eager").eval()
        ref[name] = torch_reference(m, batches)
    loaded = load_hf(d, dtype=jnp.bfloat16)
    r = quantize(loaded.model, "general/ptq/fp8_default-kv_fp8", batches, progress=False)
    ours = {k: float(r.calibration_state[k + "._amax"]) for k in ref["torch_fp32"]}
    rows = {}
    for kind in ("q_proj", "o_proj", "gate_proj", "down_proj", "k_bmm", "v_bmm"):
        keys = [k for k in ours if f".{kind}" in k]
        def rel(a, b):
            return [abs(a[k] - b[k]) / b[k] for k in keys]
        rows[kind] = {
            "n": len(keys),
            "jaxquant_bf16_vs_torch_bf16": rel(ours, ref["torch_bf16"]),
            "torch_bf16_vs_fp32": rel(ref["torch_bf16"], ref["torch_fp32"]),
            "jaxquant_bf16_vs_fp32": rel(ours, ref["torch_fp32"]),
        }
    print(f"{'quantizer':<10} {'jq bf16 vs torch bf16':>24} {'torch bf16 vs fp32':>22} {'jq bf16 vs fp32':>20}")
    print(f"{'':<10} {'max / median':>24} {'max / median':>22} {'max / median':>20}")
    for kind, v in rows.items():
        cells = [f"{100 * max(v[c]):6.2f}% / {100 * statistics.median(v[c]):5.2f}%"
                 for c in ("jaxquant_bf16_vs_torch_bf16", "torch_bf16_vs_fp32", "jaxquant_bf16_vs_fp32")]
        print(f"{kind:<10} {cells[0]:>24} {cells[1]:>22} {cells[2]:>20}")
    closer = sum(abs(ours[k] - ref["torch_fp32"][k]) <= abs(ref["torch_bf16"][k] - ref["torch_fp32"][k]) for k in ours)
    print(f"jaxquant's bf16 amax is at least as close to fp32 as torch's bf16 amax for {closer} of {len(ours)} "
          "quantizers")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/probe_bf16_amax.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "model": "SmolLM2-135M (offline asset)", "rows": args.rows,
            "seq": args.seq, "closer_or_equal": closer, "total": len(ours), "per_kind": rows,
            "amax": {"jaxquant_bf16": ours, **ref}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
