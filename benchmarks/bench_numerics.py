"""Throughput of the numerics kernels: fake quant and export quantize of FP8, NVFP4, INT8, INT4, MXFP8 and MXFP4, next to a
plain copy of the same tensor (the device's practical bandwidth).

Each kernel is jitted once, warmed up, then timed over ``--iters`` calls (blocking on the result).
GB/s counts the bytes the kernel must read and write at least (input once, outputs once), so it
compares directly with the device's memory bandwidth (an H100 SXM copy reaches about 3 TB/s).

    python benchmarks/bench_numerics.py                       # 8192x8192 bf16 on GPU, 2048x2048 on CPU
    python benchmarks/bench_numerics.py --size 4096 16384 --out bench.json
    python benchmarks/bench_numerics.py --division hardware   # what the exact division costs

``--division hardware`` swaps the kernels' exactly rounded division (``_exact.div``) for the
backend's own (``_exact.hardware_div``: approximate on GPUs and TPUs), to measure its cost. On a
CUDA GPU ``_exact.div`` is the hardware division already when ``XLA_FLAGS`` has
``--xla_backend_extra_options=-nvptx-prec-divf32=2`` (IEEE ``div.rn``; the report says which).
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp

from _timing import median_seconds, write_report

from jaxquant.numerics import _exact, fp8, int4, int8, mx, nvfp4


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="tensor shape (default 8192 8192 on an accelerator, 2048 2048 on CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--division", default="exact", choices=["exact", "hardware"],
                   help="exact: the kernels as shipped; hardware: the backend's own division (not bit-exact off CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.division == "hardware":
        fp8.div = nvfp4.div = _exact.hardware_div

    backend = jax.default_backend()
    rows, cols = args.size or ((8192, 8192) if backend != "cpu" else (2048, 2048))
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32).astype(dtype)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    n = rows * cols
    item = dtype.itemsize
    blk128 = jnp.max(jnp.abs(int4.to_blocks(x.astype(jnp.float32), 128)), axis=-1, keepdims=True)  # [rows, cols/128, 1]

    cases = [
        # name, function, args, bytes read + written
        ("copy (x + 0)", lambda a: a + jnp.zeros((), a.dtype), (x,), 2 * n * item),
        ("fp8.fake_quant", fp8.fake_quant, (x, amax), 2 * n * item),
        ("fp8.quantize", fp8.quantize, (x, amax), n * item + n),
        ("nvfp4.fake_quant_dynamic", nvfp4.fake_quant_dynamic, (x, amax), 2 * n * item),
        ("nvfp4.quantize", lambda a, g: nvfp4.quantize(a, global_amax=g), (x, amax), n * item + n // 2 + n // 16),
        ("int8.fake_quant", int8.fake_quant, (x, amax), 2 * n * item),
        ("int8.quantize (per channel)", int8.quantize, (x, jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1,
                                                                  keepdims=True)), n * item + n + rows * 4),
        ("int4.fake_quant (blocks of 128)", lambda a, b: int4.fake_quant(a, b, 128), (x, blk128), 2 * n * item),
        ("int4.quantize + pack_rows", lambda a, b: int4.pack_rows(int4.quantize(a, b[..., 0])[0]), (x, blk128),
         n * item + n // 2),
        ("mx.fake_quant (MXFP8)", mx.fake_quant, (x,), 2 * n * item),
        ("mx.quantize (MXFP8)", mx.quantize, (x,), n * item + n + n // 32),
        ("mx.fake_quant_fp4 (MXFP4)", mx.fake_quant_fp4, (x,), 2 * n * item),
        ("mx.quantize_fp4 (MXFP4)", mx.quantize_fp4, (x,), n * item + n // 2 + n // 32),
    ]
    results = []
    print(f"backend={backend} device={jax.devices()[0].device_kind} shape={rows}x{cols} dtype={args.dtype} "
          f"division={args.division} ieee_gpu_division_flag={_exact.gpu_division_is_ieee()}")
    print(f"{'kernel':28s} {'time (ms)':>10s} {'GB/s':>10s} {'Gelem/s':>10s}")
    for name, fn, fargs, nbytes in cases:
        jitted = jax.jit(fn)
        t = median_seconds(lambda: jitted(*fargs), jax.block_until_ready, args.iters, args.warmup)
        row = {"kernel": name, "seconds": t, "bytes": nbytes, "gb_per_s": nbytes / t / 1e9, "gelem_per_s": n / t / 1e9}
        results.append(row)
        print(f"{name:28s} {t * 1e3:10.3f} {row['gb_per_s']:10.1f} {row['gelem_per_s']:10.2f}")

    report = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "shape": [rows, cols],
        "dtype": args.dtype,
        "division": args.division,
        "gpu_division_is_ieee": _exact.gpu_division_is_ieee(),
        "iters": args.iters,
        "timing": "median wall time of jitted calls, blocking on the result",
        "results": results,
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
