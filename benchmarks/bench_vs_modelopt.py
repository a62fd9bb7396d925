"""jaxquant's numerics kernels side by side with ModelOpt's, on the same NVIDIA GPU.

Needs a CUDA GPU visible to both JAX and torch, and nvidia-modelopt (a test-only dependency; jaxquant
itself never imports torch or ModelOpt). For each kernel both sides quantize the same tensor, the
output bytes are compared (the count that differ is reported), and the median wall time of ``--iters`` calls is reported (JAX:
``block_until_ready``; torch: ``torch.cuda.synchronize``), with GB/s counted as in
``bench_numerics.py`` (bytes that must be read and written, once each).

    python benchmarks/bench_vs_modelopt.py --out results.json                  # 8192x8192 bf16
    python benchmarks/bench_vs_modelopt.py --division integer                  # without XLA's IEEE division

ModelOpt's side: FP8 fake quant ``tensor_quant.scaled_e4m3_impl`` (its CUDA extension where it builds),
NVFP4 dynamic fake quant ``fp4_fake_quant_block`` (Triton), NVFP4 export ``NVFP4QTensor.quantize``
(torch ops) and FP8 export ``to_quantized_weight(..., "fp8")`` (torch ops). The NVFP4 global amax is
passed as a CPU scalar, as in ModelOpt's tests (on the GPU torch divides by a reciprocal, see
docs/numerics.md).
"""

from __future__ import annotations

import argparse
import os
import platform

from _timing import median_seconds, write_report


def _jax_bytes(a) -> bytes:
    import numpy as np

    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8).tobytes()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"), default=(8192, 8192))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--division", default="ieee", choices=["ieee", "integer"],
                   help="ieee: start XLA with IEEE float32 division on the GPU (what the jaxquant command does); "
                        "integer: XLA's default approximate division, rounded exactly in integers")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    args = p.parse_args(argv)

    from jaxquant.numerics import with_ieee_gpu_division

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch as well
    if args.division == "ieee":
        os.environ["XLA_FLAGS"] = with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxquant.numerics import fp8, gpu_division_is_ieee, nvfp4

    try:
        from modelopt.torch.export.quant_utils import to_quantized_weight
        from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import fp4_fake_quant_block
        from modelopt.torch.quantization import tensor_quant
        from modelopt.torch.quantization.qtensor import NVFP4QTensor
    except ImportError as e:
        raise SystemExit(f"error: needs nvidia-modelopt with its GPU kernels ({e}); pip install nvidia-modelopt")
    if not torch.cuda.is_available() or jax.default_backend() != "gpu":
        raise SystemExit("error: needs a CUDA GPU visible to both torch and JAX")

    rows, cols = args.size
    n = rows * cols
    tdtype = getattr(torch, args.dtype)
    item = torch.tensor([], dtype=tdtype).element_size()
    x_t = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 3).to(tdtype).cuda()
    x_j = jnp.asarray(x_t.float().cpu().numpy()).astype(args.dtype)
    amax = np.float32(x_t.float().abs().max().item())
    amax_cuda = torch.tensor(amax, device="cuda")
    amax_cpu = torch.tensor(amax)
    fp8_scale = torch.tensor(amax / np.float32(448.0), device="cuda")  # ModelOpt's FP8 weight_scale

    def raw(t) -> bytes:
        """A torch tensor's bytes, whatever its dtype (numpy has no bfloat16 / float8)."""
        return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()

    def jsync(out):
        jax.block_until_ready(out)

    def tsync(_):
        torch.cuda.synchronize()

    def nv_export_mo():
        qt, wsf, wsf2 = NVFP4QTensor.quantize(x_t, 16)
        return qt._quantized_data, wsf, wsf2

    fp8_fq = jax.jit(fp8.fake_quant)
    fp8_q = jax.jit(fp8.quantize)
    nv_fq = jax.jit(nvfp4.fake_quant_dynamic)
    nv_q = jax.jit(nvfp4.quantize)
    cases = [
        # name, ours, theirs, (ours -> bytes), (theirs -> bytes), bytes moved
        ("fp8 fake quant", lambda: fp8_fq(x_j, amax), lambda: tensor_quant.scaled_e4m3_impl(x_t, amax_cuda),
         _jax_bytes, raw,
         2 * n * item),
        ("fp8 export", lambda: fp8_q(x_j, amax), lambda: to_quantized_weight(x_t, fp8_scale, "fp8"),
         lambda o: np.asarray(o[0]).view(np.uint8).tobytes(), raw,
         n * item + n),
        ("nvfp4 fake quant (dynamic)", lambda: nv_fq(x_j, amax), lambda: fp4_fake_quant_block(x_t, amax_cpu),
         _jax_bytes, raw,
         2 * n * item),
        ("nvfp4 export", lambda: nv_q(x_j), nv_export_mo,
         lambda o: _jax_bytes(o.packed) + _jax_bytes(o.block_scale) + _jax_bytes(o.global_scale),
         lambda t: raw(t[0]) + raw(t[1]) + raw(t[2].float().reshape(())),
         n * item + n // 2 + n // 16),
    ]
    device = jax.devices()[0].device_kind
    print(f"{device}; shape {rows}x{cols} {args.dtype}; XLA IEEE division: {gpu_division_is_ieee()}; "
          f"JAX {jax.__version__}, torch {torch.__version__}")
    print(f"{'kernel':28s} {'jaxquant ms':>12s} {'GB/s':>7s} {'ModelOpt ms':>12s} {'GB/s':>7s} {'differing output bytes':>24s}")
    results = []
    for name, ours, theirs, ours_bytes, theirs_bytes, nbytes in cases:
        a, b = np.frombuffer(ours_bytes(ours()), np.uint8), np.frombuffer(theirs_bytes(theirs()), np.uint8)
        diff = int((a != b).sum()) if a.size == b.size else -1  # -1: different layouts
        t_ours = median_seconds(ours, jsync, args.iters, args.warmup)
        t_theirs = median_seconds(theirs, tsync, args.iters, args.warmup)
        row = {"kernel": name, "jaxquant_s": t_ours, "modelopt_s": t_theirs, "bytes": nbytes,
               "jaxquant_gb_per_s": nbytes / t_ours / 1e9, "modelopt_gb_per_s": nbytes / t_theirs / 1e9,
               "output_bytes": int(a.size), "differing_bytes": diff}
        results.append(row)
        print(f"{name:28s} {t_ours * 1e3:12.3f} {row['jaxquant_gb_per_s']:7.0f} {t_theirs * 1e3:12.3f} "
              f"{row['modelopt_gb_per_s']:7.0f} {diff:>10d}/{a.size}")
    report = {"device": device, "jax": jax.__version__, "torch": torch.__version__,
              "python": platform.python_version(), "shape": [rows, cols], "dtype": args.dtype,
              "xla_ieee_division": gpu_division_is_ieee(), "iters": args.iters,
              "timing": "median wall time per call, synchronized", "results": results}
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
