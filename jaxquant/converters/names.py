"""HF tensor names <-> NNX paths, shared by the loaders and the exporter.

The NNX module tree mirrors transformers' (``CausalLM.model.layers[i].self_attn.q_proj.weight``),
so the map is a prefix substitution and is pure data per family (``FamilySpec.text_prefix`` and
``legacy_renames`` in ``models/config.py``):

* NNX ``model.<rest>``  <->  HF ``<text_prefix><rest>``
  (``model.`` for ``*ForCausalLM``; ``model.language_model.`` for Gemma 3/4 ConditionalGeneration);
* NNX ``lm_head.<rest>`` <-> HF ``lm_head.<rest>``.

The same map names quantizers: NNX ``model.layers.0.self_attn.q_proj.input_quantizer`` is ModelOpt's
``<text_prefix>layers.0.self_attn.q_proj.input_quantizer``.

Checkpoints written by older transformers use other prefixes (``language_model.model.`` ...);
``canonical()`` rewrites them to the transformers-v5 names that export writes back.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from flax import nnx

from jaxquant.models.config import ModelConfig, family_spec

# HF keys some checkpoints carry that are not parameters (rotary buffers of old Llama exports).
IGNORED_PATTERNS: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)rotary_emb\..*_inv_freq$")

PathLike = str | Sequence[str | int]


def dotted(path: PathLike) -> str:
    """``("model", "layers", 0, "weight")`` -> ``"model.layers.0.weight"``."""
    if isinstance(path, str):
        return path
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Prefix map between NNX paths and HF names for one checkpoint layout."""

    text_prefix: str = "model."
    legacy_renames: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = IGNORED_PATTERNS

    @classmethod
    def for_config(cls, config: ModelConfig) -> "NameMap":
        spec = family_spec(config.architecture)
        return cls(text_prefix=config.text_prefix, legacy_renames=spec.legacy_renames)

    # ------------------------------------------------------------------ NNX -> HF
    def hf_name(self, nnx_path: PathLike) -> str:
        """HF (transformers v5) name of an NNX param / module path."""
        p = dotted(nnx_path)
        if p == "model" or p.startswith("model."):
            return self.text_prefix + p[len("model."):] if p != "model" else self.text_prefix.rstrip(".")
        return p

    # ------------------------------------------------------------------ HF -> NNX
    def canonical(self, hf_name: str) -> str:
        """Rewrite a legacy checkpoint name to the transformers-v5 name (identity otherwise)."""
        for old, new in self.legacy_renames:
            if hf_name.startswith(old):
                return new + hf_name[len(old):]
        return hf_name

    def nnx_path(self, hf_name: str) -> str | None:
        """NNX dotted path of an HF tensor, or None when it is not part of the text decoder."""
        n = self.canonical(hf_name)
        if n.startswith(self.text_prefix):
            return "model." + n[len(self.text_prefix):]
        if n.startswith("lm_head."):
            return n
        return None

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.search(p, hf_name) for p in self.ignored)


def param_paths(model: nnx.Module) -> list[str]:
    """Dotted NNX paths of every ``nnx.Param`` of ``model``."""
    from jaxquant.models.walk import iter_variables

    return [dotted(p) for p, _ in iter_variables(model, nnx.Param)]


def hf_param_names(model: nnx.Module, name_map: NameMap | None = None) -> dict[str, str]:
    """``{nnx path: HF name}`` for every parameter."""
    nm = name_map or NameMap.for_config(model.config)
    return {p: nm.hf_name(p) for p in param_paths(model)}


def iter_quantizers(model: nnx.Module, name_map: NameMap | None = None) -> Iterable[tuple[str, nnx.Module]]:
    """``(ModelOpt quantizer name, TensorQuantizer)`` for every quantizer site of ``model`` (one name per
    site: a stacked expert quantizer's NNX path mapped to HF; ``calibration.quantizer_sites`` gives per-expert
    names)."""
    from jaxquant.calibration.sites import quantizer_sites

    nm = name_map or NameMap.for_config(model.config)
    for s in quantizer_sites(model, nm.hf_name):
        yield nm.hf_name(s.path), s.quantizer


__all__ = ["IGNORED_PATTERNS", "NameMap", "dotted", "hf_param_names", "iter_quantizers", "param_paths"]
