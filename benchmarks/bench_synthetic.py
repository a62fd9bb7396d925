"""Benchmark: jaxquant's PTQ job on a synthetic checkpoint of a full-size shape (no file on disk to read).

    python benchmarks/bench_synthetic.py --shape gemma4-31b --recipe general/ptq/fp8_qkvo-nvfp4_mlp \
        --calib-size 512 --calib-seq 512 --batch-size 16 --export-path /tmp/synth/out --out benchmarks/results

The weights come from ``converters.synthetic.load_synthetic`` (a config and a seed, generated while loading: the
full-depth Gemma-4-31B shape is 62 GB in bf16, more than the device machines' 64 GB disk can hold beside an export);
the calibration tokens are uniform random ids. It runs what ``jaxquant ptq`` runs: load, ``quantize`` with the export
started when the weights are calibrated (``export.early``), the rest of the export. Prints per-phase seconds,
calibration tokens/s, peak device memory and export GB/s, and writes ``bench_synthetic_<shape>.json``. ModelOpt is
not run here: it needs the checkpoint on disk (``bench_e2e_vs_modelopt.py`` for shapes that fit). ``--layerwise``
calibrates layer by layer with the parameters in host memory (the shape of a model larger than the device).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODEL_TYPES = {"LlamaConfig": "llama", "Gemma4TextConfig": "gemma4_text"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama8b", help="a bench_e2e_vs_modelopt shape: llama8b, gemma4-31b[:N], tiny")
    p.add_argument("--recipe", default="general/ptq/fp8_qkvo-nvfp4_mlp")
    p.add_argument("--algorithm", default=None,
                   help="calibrate with this bench_quality.ALGORITHMS entry (max, mse, local_hessian, gptq, awq_lite, "
                        "smoothquant, svdquant, ...) instead of the recipe's own algorithm")
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--calib-seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layerwise", action="store_true", help="parameters in host memory, calibration layer by layer")
    p.add_argument("--stream", action="store_true",
                   help="streamed --layerwise (calibration/streaming.py): each decoder layer generated, calibrated, "
                        "exported and dropped in turn; the model is never whole on the device or the host (llama70b)")
    p.add_argument("--export-path", default=None, help="write the HF export here (default: no export)")
    p.add_argument("--out", default=None, help="write the JSON report into this folder")
    args = p.parse_args(argv)
    recipe = args.recipe
    if args.algorithm:
        from bench_quality import cell_config, recipe_config

        recipe = cell_config(recipe_config(args.recipe), args.algorithm)
        if recipe is None:
            raise SystemExit(f"--algorithm {args.algorithm} does not apply to the weight formats of {args.recipe}")

    import os

    from jaxquant.numerics.xla_flags import with_device_memory_default

    os.environ.update(with_device_memory_default(os.environ))  # as the jaxquant command: 90 % of the device
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench_e2e_vs_modelopt import shape_config
    from jaxquant.calibration import quantize
    from jaxquant.cli_ptq import parking_device
    from jaxquant.converters.synthetic import load_synthetic
    from jaxquant.export.early import EarlyExport

    cfg_cls, model_cls, kw = shape_config(args.shape)
    hf_config = dict(kw, architectures=[model_cls], model_type=MODEL_TYPES[cfg_cls], dtype=args.dtype)
    if args.stream:
        return run_streamed(args, hf_config)
    dev = jax.devices()[0]
    phases: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    sharding = None
    if args.layerwise:
        parked = parking_device()
        sharding = jax.sharding.SingleDeviceSharding(parked) if parked is not None else None
    loaded = load_synthetic(hf_config, getattr(jnp, args.dtype), seed=args.seed, sharding=sharding)
    params = jax.tree_util.tree_leaves(nnx.state(loaded.model, nnx.Param))
    jax.block_until_ready(params)
    phases["load (generate + copy)"] = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in params)

    ids = np.random.default_rng(args.seed).integers(3, loaded.config.vocab_size,
                                                    (args.calib_size, args.calib_seq)).astype(np.int32)
    target = Path(args.export_path) if args.export_path else None
    if target is not None and target.exists():
        shutil.rmtree(target)
    early: list[EarlyExport] = []

    def start():
        if target is not None:
            early.append(EarlyExport(loaded, target))

    t0 = time.perf_counter()
    res = quantize(loaded.model, recipe, (ids, np.ones_like(ids)), batch_size=args.batch_size, progress=False,
                   layerwise=args.layerwise, on_weights_calibrated=None if args.layerwise else start)
    phases["calibrate"] = time.perf_counter() - t0
    summary = None
    t0 = time.perf_counter()
    if target is not None:
        if not early:  # layerwise: no early start (the weights live in host memory)
            from jaxquant.export import export_hf

            summary = export_hf(loaded, target)
        else:
            summary = early[0].finish()
        phases["export (after the calibration)"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    stats = dev.memory_stats() or {}
    rep = {
        "shape": args.shape, "recipe": args.recipe, "algorithm": args.algorithm or "recipe's own",
        "calib_size": args.calib_size, "calib_seq": args.calib_seq, "batch_size": args.batch_size, "dtype": args.dtype, "layerwise": args.layerwise, "parameters": n_params,
        "device": dev.device_kind, "host": platform.node(), "phases_s": phases, "total_s": total,
        "timings": res.timings, "calib_tokens_per_s": res.stats.tokens_per_s,
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "export_bytes": summary.total_bytes if summary is not None else None,
        "export_gb_per_s_from_calibration_end": (summary.total_bytes / phases["export (after the calibration)"] / 1e9
                                                 if summary is not None else None),
        "jax": jax.__version__,
    }
    print(f"\n{args.shape} ({n_params / 1e9:.2f} B parameters, synthetic), {args.recipe}"
          f"{', algorithm ' + args.algorithm if args.algorithm else ''}, "
          f"{args.calib_size} x {args.calib_seq}, batch {args.batch_size}{', layerwise' if args.layerwise else ''}, "
          f"{dev.device_kind}")
    print(f"| {'phase':<40} | {'seconds':>9} |\n|{'-' * 42}|{'-' * 11}|")
    for k, v in phases.items():
        print(f"| {k:<40} | {v:>9.2f} |")
    print(f"| {'total':<40} | {total:>9.2f} |")
    print(f"calibration forward: {res.stats.tokens_per_s:,.0f} tokens/s; peak device memory "
          f"{(rep['peak_device_bytes'] or 0) / 2**30:.1f} GiB"
          + (f"; export {summary.total_bytes / 1e9:.2f} GB" if summary is not None else ""))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        alg = f"_{args.algorithm}" if args.algorithm else ""
        f = out / f"bench_synthetic_{args.shape.replace(':', '-')}{alg}{'_layerwise' if args.layerwise else ''}.json"
        f.write_text(json.dumps(rep, indent=1))
        print(f"wrote {f}")
    return rep


def host_peak_rss() -> int:
    """Peak resident set size of this process in bytes (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_streamed(args, hf_config) -> dict:
    """``--stream``: ``quantize_streamed`` from the synthetic source into a ``StreamedExport`` (what ``jaxquant ptq
    --layerwise`` runs on a safetensors checkpoint). Nothing but the export is written to disk."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxquant.calibration.algorithms import resolve_algorithm
    from jaxquant.calibration.streaming import quantize_streamed
    from jaxquant.cli_ptq import parking_device
    from jaxquant.converters.hf import LOAD_WORKERS
    from jaxquant.converters.synthetic import open_synthetic
    from jaxquant.export.streamed import StreamedExport
    from jaxquant.recipe import apply_recipe, load_recipe

    dev = jax.devices()[0]
    t_all = time.perf_counter()
    dtype = getattr(jnp, args.dtype)
    loaded, source = open_synthetic(hf_config, dtype, seed=args.seed)
    recipe = load_recipe(args.recipe)
    resolution = apply_recipe(loaded.model, recipe, warn=False)
    target = Path(args.export_path) if args.export_path else None
    if target is not None and target.exists():
        shutil.rmtree(target)
    t0 = time.perf_counter()
    export = StreamedExport(loaded, target, resolution=resolution) if target is not None else None
    plan_s = time.perf_counter() - t0
    ids = np.random.default_rng(args.seed).integers(3, loaded.config.vocab_size,
                                                    (args.calib_size, args.calib_seq)).astype(np.int32)
    batches = [(ids[i:i + args.batch_size], np.ones_like(ids[i:i + args.batch_size]))
               for i in range(0, len(ids), args.batch_size)]
    _, options = resolve_algorithm(recipe.algorithm)
    try:
        res, summary = quantize_streamed(loaded, source, resolution, batches, dtype=dtype, export=export,
                                         progress=sys.stderr.isatty(), park=parking_device(), options=options,
                                         workers=LOAD_WORKERS)
    except BaseException:
        if export is not None:
            export.cancel()
        raise
    total = time.perf_counter() - t_all
    t = res.timings
    phases = {"plan the export layout": plan_s, "wait for parameters": t["load"],
              "weight amax": t["weights"], "compile": t["compile"], "forward passes": t["calibrate"],
              "finalize": t["finalize"], "export (waits on the writer)": t["export"]}
    n_params = sum(int(np.prod(s)) for s in source.shapes.values())
    stats = dev.memory_stats() or {}
    rep = {
        "shape": args.shape, "recipe": args.recipe, "calib_size": args.calib_size, "calib_seq": args.calib_seq,
        "batch_size": args.batch_size, "dtype": args.dtype, "layerwise": True, "streamed": True,
        "parameters": n_params, "device": dev.device_kind, "host": platform.node(), "phases_s": phases,
        "total_s": total, "timings": t, "calib_tokens_per_s": res.stats.tokens_per_s,
        "peak_device_bytes": stats.get("peak_bytes_in_use"), "host_peak_rss_bytes": host_peak_rss(),
        "export_bytes": summary.total_bytes if summary is not None else None,
        "export_gb_per_s_over_total": summary.total_bytes / total / 1e9 if summary is not None else None,
        "jax": jax.__version__,
    }
    print(f"\n{args.shape} ({n_params / 1e9:.2f} B parameters, synthetic, streamed), {args.recipe}, "
          f"{args.calib_size} x {args.calib_seq}, batch {args.batch_size}, {dev.device_kind}")
    print(f"| {'phase':<40} | {'seconds':>9} |\n|{'-' * 42}|{'-' * 11}|")
    for k, v in phases.items():
        print(f"| {k:<40} | {v:>9.2f} |")
    print(f"| {'total':<40} | {total:>9.2f} |")
    print(f"calibration forward: {res.stats.tokens_per_s:,.0f} tokens/s; peak device memory "
          f"{(rep['peak_device_bytes'] or 0) / 2**30:.1f} GiB; host peak RSS {rep['host_peak_rss_bytes'] / 2**30:.1f} GiB"
          + (f"; export {summary.total_bytes / 1e9:.2f} GB, {rep['export_gb_per_s_over_total']:.2f} GB/s over the "
             "whole run" if summary is not None else ""))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        f = out / f"bench_synthetic_{args.shape.replace(':', '-')}_streamed.json"
        f.write_text(json.dumps(rep, indent=1))
        print(f"wrote {f}")
    return rep


if __name__ == "__main__":
    main()
