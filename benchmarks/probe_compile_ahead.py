"""Where the ahead-of-time compilation of ``jaxquant ptq`` spends its time (a probe, not a benchmark).

    python benchmarks/probe_compile_ahead.py --shape llama8b gemma4-31b:12 [--recipe R] [--batch 16 --seq 512]

For each shape of ``bench_e2e_vs_modelopt.py`` (no checkpoint: the model is abstract), in a fresh process, runs
``calibration.ahead.compile_calibration_ahead`` as ``jaxquant ptq`` does (with the export kernels) under cProfile
and prints its total, the seconds inside XLA's backend compiler, and the cumulative seconds of jaxquant's own steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

STEPS = ("abstract_model", "apply_recipe", "weight_reducer", "warm_export_kernels", "stages.py:154(compile)",
         "_compiled", "eval_shape", "backend_compile_and_load", "block_until_ready")


def one(shape: str, recipe: str, batch: int, seq: int) -> None:
    import transformers

    import bench_e2e_vs_modelopt as b
    from jaxquant.numerics._exact import with_ieee_gpu_division

    os.environ["XLA_FLAGS"] = with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))
    import jax
    import jax.numpy as jnp

    from jaxquant.calibration.ahead import compile_calibration_ahead
    from jaxquant.models.config import ModelConfig
    from jaxquant.recipe import load_recipe

    jax.devices()
    cfg_cls, model_cls, kw = b.shape_config(shape)
    hf = getattr(transformers, cfg_cls)(**kw).to_dict() | {"architectures": [model_cls]}
    config = ModelConfig.from_hf_config(json.loads(json.dumps(hf)))
    rec = load_recipe(recipe)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    r = compile_calibration_ahead(config, jnp.bfloat16, rec, seq, batch, export_dtype=jnp.bfloat16)
    pr.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(pr)
    rows = {}
    for (file, line, fn), (_, _, _, cum, _) in st.stats.items():
        label = f"{Path(file).name}:{line}({fn})"
        for step in STEPS:
            if step in label:
                rows[label] = max(rows.get(label, 0.0), cum)
    print(f"{shape}: compile_calibration_ahead {total:.2f} s, {r.compiled} executables ({jax.devices()[0].device_kind})")
    for label, cum in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"  {cum:7.2f} s  {label}")
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
    print(s.getvalue()[-3500:], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="+", default=["llama8b"])
    ap.add_argument("--recipe", default="general/ptq/fp8_qkvo-nvfp4_mlp")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one, a.recipe, a.batch, a.seq)
    for shape in a.shape:
        subprocess.run([sys.executable, __file__, "--one", shape, "--recipe", a.recipe, "--batch", str(a.batch),
                        "--seq", str(a.seq)], check=True)


if __name__ == "__main__":
    main()
