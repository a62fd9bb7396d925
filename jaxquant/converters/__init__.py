"""Checkpoint converters: HF safetensors directories and GGUF files -> jaxquant models.

``load_hf(dir)`` / ``load_gguf(file)`` return a ``LoadedModel`` (model, config, lazy extra tensors,
HF config dict, source). ``open_hf(dir)`` opens a checkpoint without loading it (abstract parameters plus the
memory-mapped ``TensorSource``; ``plan_load`` / ``load_params`` read any subset: the streamed ``--layerwise`` path).
``NameMap`` (names.py) maps NNX paths to HF names and back; export uses
the same map.
"""

from jaxquant.converters.gguf import load_gguf
from jaxquant.converters.hf import (
    LazyTensor,
    LoadedModel,
    load_hf,
    load_params,
    load_tokenizer,
    materialize,
    open_hf,
    plan_load,
)
from jaxquant.converters.names import NameMap, hf_param_names, iter_quantizers

__all__ = [
    "LazyTensor",
    "LoadedModel",
    "NameMap",
    "hf_param_names",
    "iter_quantizers",
    "load_gguf",
    "load_hf",
    "load_params",
    "load_tokenizer",
    "materialize",
    "open_hf",
    "plan_load",
]
