"""Throughput of every registered format: fake quant (each ``QUANTIZER_FORMATS`` entry) and quantize-to-storage (each
``FORMATS`` entry's ``export_tensors``), next to a plain copy of the same tensor (the device's practical bandwidth).

    python benchmarks/bench_numerics.py --out bench_numerics.json     # 8192x8192 bf16 on GPU, 1024x1024 on CPU
    python benchmarks/bench_numerics.py --size 4096 16384 --dtype float32
    python benchmarks/bench_numerics.py --division hardware           # what the exact division costs

Fake quant runs a ``TensorQuantizer`` set up by ``jaxquant.formats.examples.quantizer`` (amax from the tensor, as max
calibration of a weight), jitted as a model calls it; the K/V-only affine formats run on ``[B, S, heads, 128]`` of the
same element count. Quantize-to-storage is ``export_tensors`` as the exporter calls it (its kernels are jitted; the
host-side shape and finiteness checks are included). Each is warmed up, then timed over ``--iters`` calls (blocking
on the result): the median. GB/s counts the bytes the kernel must at least read and write (the input once, the
outputs once), so it compares directly with the copy's GB/s (an H100 SXM copy reaches about 3 TB/s); ``vs copy`` is
the ratio.

``--division hardware`` swaps the kernels' exactly rounded division (``_exact.div``) for the backend's own
(``_exact.hardware_div``: approximate on GPUs and TPUs), to measure its cost. On a CUDA GPU ``_exact.div`` is the
hardware division already when ``XLA_FLAGS`` has ``--xla_backend_extra_options=-nvptx-prec-divf32=2`` (IEEE
``div.rn``; the report says which).
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

from _timing import median_seconds, write_report

from jaxquant.formats.examples import export_inputs, is_kv_only, quantizer
from jaxquant.formats.registry import FORMATS, QUANTIZER_FORMATS
from jaxquant.numerics import _exact, fp8, nvfp4


def _nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def cases(x: jax.Array):
    """``[(kind, name, zero-argument call, bytes read + written)]``: the copy, every fake quant, every export."""
    n, item = x.size, x.dtype.itemsize
    out = [("copy", "x + 0", (lambda f: lambda: f(x))(jax.jit(lambda a: a + jnp.zeros((), a.dtype))), 2 * n * item)]
    for name in QUANTIZER_FORMATS:
        t = x
        if is_kv_only(name):  # [B, 8, 4 heads, 128]; skipped when the element count does not split so
            if n % (8 * 4 * 128):
                continue
            t = x.reshape(-1, 8, 4, 128)
        q = quantizer(name, t)
        out.append(("fake_quant", name, (lambda f, a: lambda: f(a))(jax.jit(lambda a, q=q: q(a)), t), 2 * n * item))
    for fmt, qf in FORMATS.items():
        w_amax, blk, in_amax = export_inputs(fmt, x)
        call = (lambda qf, w_amax, blk, in_amax: lambda: qf.export_tensors_deferred(
            x, w_amax, block_amax=blk, in_amax=in_amax)[0])(qf, w_amax, blk, in_amax)
        out.append(("export", fmt, call, n * item + _nbytes(call())))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="tensor shape (default 8192 8192 on an accelerator, 1024 1024 on CPU); multiples of 128")
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
    rows, cols = args.size or ((8192, 8192) if backend != "cpu" else (1024, 1024))
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32).astype(dtype)
    n = rows * cols
    print(f"backend={backend} device={jax.devices()[0].device_kind} shape={rows}x{cols} dtype={args.dtype} "
          f"division={args.division} ieee_gpu_division_flag={_exact.gpu_division_is_ieee()}")
    print(f"{'kind':10s} {'format':20s} {'time (ms)':>10s} {'GB/s':>9s} {'vs copy':>8s} {'Gelem/s':>9s}")
    results, copy_gbs = [], None
    for kind, name, fn, nbytes in cases(x):
        t = median_seconds(fn, jax.block_until_ready, args.iters, args.warmup)
        gbs = nbytes / t / 1e9
        copy_gbs = copy_gbs or gbs
        row = {"kind": kind, "format": name, "seconds": t, "bytes": nbytes, "gb_per_s": gbs,
               "vs_copy": gbs / copy_gbs, "gelem_per_s": n / t / 1e9}
        results.append(row)
        print(f"{kind:10s} {name:20s} {t * 1e3:10.3f} {gbs:9.1f} {row['vs_copy']:8.2f} {row['gelem_per_s']:9.2f}")

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
        "timing": "median wall time of jitted calls (export: export_tensors as the exporter calls it), blocking",
        "copy_gb_per_s": copy_gbs,
        "results": results,
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
