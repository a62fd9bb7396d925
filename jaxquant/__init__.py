"""jaxquant: post-training quantization for JAX/Flax, a faithful port of NVIDIA ModelOpt's PTQ.

Where things live:
  numerics/     FP8 e4m3 and NVFP4 e2m1 quantization (pure jitted functions)
  formats/      one object per ModelOpt format (export tensors, dequantize, hf_quant_config names), a registry
  quantizer/    QuantizerConfig (a format) and TensorQuantizer (a site with calibrated amax)
  recipe/       ModelOpt YAML recipes and the quantizer-name matcher (YAML files: recipes/)
  models/       Flax NNX decoders (Llama, Mistral, Qwen2/3, Gemma 3/4, Mixtral, Qwen3-MoE)
  converters/   HF safetensors / GGUF checkpoints -> models
  data/, eval/  calibration and evaluation text, perplexity
  calibration/  max calibration and the quantize() entry point
  export/       ModelOpt unified HF checkpoints, orbax, loading quantized checkpoints
  qat/          quantization-aware training in Flax loops

Typical use::

    import jaxquant as jq
    loaded = jq.load_hf("path/to/hf_model")
    recipe = jq.load_recipe("general/ptq/nvfp4_default-kv_fp8")
    result = jq.quantize(loaded.model, recipe, batches)
    jq.export_hf(loaded, "out_dir", resolution=result.resolution)
"""

from jaxquant._version import __version__

# Public names, imported on first use (PEP 562) so that ``import jaxquant`` and the ``jaxquant``
# command start without importing JAX: a Ctrl-C or ``--help`` in the first second is handled by the
# command, not lost in an import.
_LAZY = {
    "jaxquant.calibration": ("QuantizeResult", "calibration_state", "load_calibration_state", "quantize",
                             "read_calibration_state", "save_calibration_state", "set_quant_mode"),
    "jaxquant.check": ("Report", "validate_checkpoint"),
    "jaxquant.converters": ("LoadedModel", "load_gguf", "load_hf", "load_tokenizer"),
    "jaxquant.errors": ("CheckpointError", "DataError", "ExportError", "JaxquantError", "NonFiniteError",
                        "RecipeError", "UnsupportedError"),
    "jaxquant.eval": ("PerplexityResult", "perplexity"),
    "jaxquant.export": ("check_exportable", "export_hf", "load_quantized", "restore_orbax", "save_orbax"),
    "jaxquant.models": ("CausalLM", "ModelConfig", "generate"),
    "jaxquant.numerics": ("e2m1", "fp8", "nvfp4"),
    "jaxquant.qat": ("finish_qat", "prepare_qat"),
    "jaxquant.quantizer": ("QuantizerConfig", "TensorQuantizer"),
    "jaxquant.recipe": ("Recipe", "Resolution", "apply_recipe", "list_recipes", "load_recipe", "preset_recipe",
                        "recipe_from_dict"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxquant' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(module)
    value = getattr(mod, name) if hasattr(mod, name) else importlib.import_module(f"{module}.{name}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))


__all__ = [
    "__version__",
    # loading
    "LoadedModel",
    "load_hf",
    "load_gguf",
    "load_tokenizer",
    "load_quantized",
    "CausalLM",
    "ModelConfig",
    "generate",
    # recipes
    "Recipe",
    "Resolution",
    "load_recipe",
    "recipe_from_dict",
    "preset_recipe",
    "list_recipes",
    "apply_recipe",
    "QuantizerConfig",
    "TensorQuantizer",
    # numerics
    "fp8",
    "nvfp4",
    "e2m1",
    # calibration
    "quantize",
    "QuantizeResult",
    "set_quant_mode",
    "calibration_state",
    "load_calibration_state",
    "save_calibration_state",
    "read_calibration_state",
    # evaluation
    "perplexity",
    "PerplexityResult",
    # export
    "export_hf",
    "check_exportable",
    "save_orbax",
    "validate_checkpoint",
    "Report",
    "restore_orbax",
    # QAT
    "prepare_qat",
    "finish_qat",
    # errors
    "JaxquantError",
    "RecipeError",
    "UnsupportedError",
    "CheckpointError",
    "NonFiniteError",
    "DataError",
    "ExportError",
]
