"""FP8 E4M3 and NVFP4 (E2M1 + E4M3 block scales) quantization, bit-exact with NVIDIA ModelOpt.

Modules: ``fp8`` (fake quant, export quantize/dequantize), ``e2m1`` (4-bit codes, packing),
``nvfp4`` (dynamic and static fake quant, export), ``checks`` (host-side finiteness checks).
Every kernel is a pure jittable function with float32 internal math; see docs/numerics.md.
"""
