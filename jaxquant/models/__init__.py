"""Flax NNX decoders whose module paths are the Hugging Face tensor names.

``ModelConfig`` (config.py) describes a model; ``ARCHITECTURES`` maps HF architecture names to the
per-family switches; ``CausalLM`` (decoder.py) is the shared decoder; ``layers.py`` holds the
building blocks with their ModelOpt quantizer sites; ``generate.py`` a small greedy preview.
"""

from jaxquant.models.config import ARCHITECTURES, FamilySpec, ModelConfig, RopeConfig, supported_architectures
from jaxquant.models.decoder import CausalLM, DecoderLayer, DecoderModel, abstract_model, build_model
from jaxquant.models.generate import generate, generate_ids
from jaxquant.models.layers import MLP, Attention, Embedding, Linear, RMSNorm

__all__ = [
    "ARCHITECTURES",
    "Attention",
    "CausalLM",
    "DecoderLayer",
    "DecoderModel",
    "Embedding",
    "FamilySpec",
    "Linear",
    "MLP",
    "ModelConfig",
    "RMSNorm",
    "RopeConfig",
    "abstract_model",
    "build_model",
    "generate",
    "generate_ids",
    "supported_architectures",
]
