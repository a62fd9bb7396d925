"""FP8 E4M3 and NVFP4 (E2M1 + E4M3 block scales) quantization, bit-exact with NVIDIA ModelOpt.

Modules: ``fp8`` (fake quant, export quantize/dequantize), ``e2m1`` (4-bit codes, packing),
``nvfp4`` (dynamic and static fake quant, export), ``checks`` (host-side finiteness checks).
Every kernel is a pure jittable function with float32 internal math; see docs/numerics.md.

The results are the same bits on every backend. On NVIDIA GPUs they are faster when XLA divides with
IEEE rounding; ask for it before JAX starts a backend::

    os.environ["XLA_FLAGS"] = jaxquant.numerics.with_ieee_gpu_division(os.environ.get("XLA_FLAGS", ""))
"""

from jaxquant.numerics.xla_flags import with_ieee_gpu_division  # no JAX import: usable before JAX starts


def __getattr__(name):
    if name == "gpu_division_is_ieee":  # imports JAX
        from jaxquant.numerics._exact import gpu_division_is_ieee

        return gpu_division_is_ieee
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["gpu_division_is_ieee", "with_ieee_gpu_division"]
