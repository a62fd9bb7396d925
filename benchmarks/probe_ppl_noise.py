"""How much perplexity moves when a checkpoint's activation scales move by one float32 ulp (a probe, not a benchmark).

Two exports whose weights are byte-identical and whose ``input_scale`` tensors differ in the last bit (jaxquant and
ModelOpt calibrating the same tokens: their activations differ in float accumulation order) can differ in perplexity.
This probe measures that noise floor: it evaluates an export, then copies of it whose every ``input_scale`` is moved
one ulp up or down (one random direction per fused group, so q/k/v and gate/up keep one scale), with the evaluator
``bench_quality.py`` uses. A same-algorithm difference between two tools smaller than this spread is not a quality
difference.

    python benchmarks/probe_ppl_noise.py --export DIR [--other DIR] --model smollm2 --seeds 4 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

_FUSED = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.input_scale$")


def group_of(name: str) -> str:
    """The fused group an ``input_scale`` belongs to (q/k/v, gate/up), else the name itself."""
    m = _FUSED.search(name)
    if not m:
        return name
    kind = "qkv" if m[1] in ("q_proj", "k_proj", "v_proj") else "gate_up"
    return name[:m.start()] + "." + kind


def perturb(src: Path, dst: Path, seed: int) -> int:
    """Copy export ``src`` to ``dst`` with every ``input_scale`` moved one float32 ulp (direction per fused group,
    drawn with ``seed``); returns how many tensors moved."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    direction: dict[str, float] = {}
    n = 0
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        for k in sorted(tensors):
            if not k.endswith(".input_scale"):
                continue
            d = direction.setdefault(group_of(k), np.inf if rng.random() < 0.5 else -np.inf)
            s = np.atleast_1d(tensors[k].float().numpy())
            moved = np.nextafter(s, np.float32(d)).astype(np.float32).reshape(tensors[k].shape)
            tensors[k] = torch.from_numpy(moved).to(tensors[k].dtype)
            n += 1
        save_file(tensors, f, metadata={"format": "pt"})
    return n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="an HF export (bench_quality's evaluator reads it)")
    p.add_argument("--other", default=None, help="a second export of the same model to evaluate beside it")
    p.add_argument("--model", default="smollm2", help="the source model (bench_quality --model): its tokenizer")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seq", type=int, default=512)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax.numpy as jnp

    import bench_quality as bq
    from jaxquant.cli_ptq import load_model
    from jaxquant.data import config_token_ids, load_eval_text
    from jaxquant.eval import eval_windows

    loaded, _ = load_model(str(bq.model_dir(args.model)), jnp.float32)
    tok, special = loaded.tokenizer(), config_token_ids(loaded.hf_config)
    windows = {k: eval_windows(tok, load_eval_text(n, s), seq_len=args.eval_seq, n_windows=args.eval_windows,
                               bos_id=special["bos_id"], vocab_size=loaded.config.vocab_size)
               for k, (n, s) in bq.EVAL_TEXTS.items()}
    del loaded
    rows = {"export": bq.evaluate(Path(args.export), windows, 4)}
    if args.other:
        rows["other"] = bq.evaluate(Path(args.other), windows, 4)
    with tempfile.TemporaryDirectory(prefix="ppl_noise_") as tmp:
        for seed in range(args.seeds):
            d = Path(tmp) / f"s{seed}"
            perturb(Path(args.export), d, seed)
            rows[f"export, input_scale +-1 ulp (seed {seed})"] = bq.evaluate(d, windows, 4)
            shutil.rmtree(d)
    print(f"| checkpoint | {' | '.join(windows)} |\n|---|{'---:|' * len(windows)}")
    for k, v in rows.items():
        print(f"| {k} | {' | '.join(f'{v[t]:.3f}' for t in windows)} |")
    spread = {t: max(v[t] for k, v in rows.items() if k != "other") - min(v[t] for k, v in rows.items()
                                                                          if k != "other") for t in windows}
    print("spread of the export and its ulp copies: " + ", ".join(f"{t} {s:.3f}" for t, s in spread.items()))
    rep = {"command": " ".join(sys.argv), "export": args.export, "other": args.other, "model": args.model,
           "eval": {"windows": args.eval_windows, "seq": args.eval_seq}, "perplexity": rows, "spread": spread}
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
    return rep


if __name__ == "__main__":
    main()
