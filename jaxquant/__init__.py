"""jaxquant: post-training quantization for JAX/Flax, a faithful port of NVIDIA ModelOpt's PTQ.

Where things live:
  numerics/     FP8 e4m3 and NVFP4 e2m1 quantization (pure jitted functions)
  quantizer/    QuantizerConfig (a format) and TensorQuantizer (a site with calibrated amax)
  recipe/       ModelOpt YAML recipes and the quantizer-name matcher
  models/       Flax NNX decoders (Llama, Mistral, Qwen2/3, Gemma 3/4, Mixtral, Qwen3-MoE)
  converters/   HF safetensors / GGUF checkpoints -> models
  data/         calibration and evaluation text
  calibration/  max calibration and the quantize() entry point
  export/       ModelOpt unified HF checkpoints and orbax
"""

from jaxquant._version import __version__
from jaxquant.errors import JaxquantError

__all__ = ["__version__", "JaxquantError"]
