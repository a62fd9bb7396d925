"""The quantizer sites of a model, with their ModelOpt names, roles and weights.

A *site* is one ``TensorQuantizer`` module of the model. A plain site has one ModelOpt name
(``model.layers.3.self_attn.q_proj.input_quantizer``); a stacked MoE site (``instances=E``) has
``E`` names, one per expert (``model.layers.3.mlp.experts.7.gate_proj.input_quantizer``), from
the owning module's ``quantizer_names(attr)`` (the protocol of ``recipe/apply.py``).

Names are ModelOpt's, i.e. the HF module names: the NNX path mapped through the checkpoint's
``NameMap`` (``model.`` -> ``model.language_model.`` for multimodal Gemma), identity for models
without a ``config`` (tests, user models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxquant.quantizer.config import QuantizerConfig
from jaxquant.quantizer.tensor_quantizer import TensorQuantizer

ROLES = ("weight", "input", "output", "bmm", "other")


def role_of(attr: str) -> str:
    """``"weight"`` / ``"input"`` / ``"output"`` / ``"bmm"`` from a quantizer attribute name."""
    leaf = attr.rpartition(".")[2]
    if leaf.endswith("weight_quantizer"):
        return "weight"
    if leaf.endswith("input_quantizer"):
        return "input"
    if leaf.endswith("output_quantizer"):
        return "output"
    if leaf.endswith("bmm_quantizer"):
        return "bmm"
    return "other"


@dataclasses.dataclass(eq=False)
class Site:
    """One ``TensorQuantizer`` of a model.

    Attributes:
      path: its dotted NNX path.
      quantizer: the module.
      parent: the nearest enclosing non-quantizer module.
      attr: the quantizer's path below ``parent`` (``"weight_quantizer"``).
      names: ModelOpt names, one per instance (one for a plain quantizer).
      role: "weight", "input", "output", "bmm" (k/v/q attention quantizers) or "other".
    """

    path: str
    quantizer: TensorQuantizer
    parent: Any
    attr: str
    names: tuple[str, ...]
    role: str

    @property
    def stacked(self) -> bool:
        return self.quantizer.instances is not None

    @property
    def config(self) -> QuantizerConfig | None:
        q = self.quantizer
        return q.config if q.enabled else None

    @property
    def is_activation(self) -> bool:
        return self.role in ("input", "output", "bmm", "other")

    @property
    def calibrates_from_data(self) -> bool:
        """An enabled, non-dynamic, non-constant activation quantizer (collects max |x|)."""
        cfg = self.config
        return cfg is not None and self.is_activation and cfg.needs_calibration

    @property
    def has_state(self) -> bool:
        """Whether the site carries calibrated state (amax) worth saving: enabled weight
        quantizers and data-calibrated activation quantizers. Constant-amax (KV ``*_cast``) and
        dynamic quantizers carry none, as in ModelOpt."""
        cfg = self.config
        if cfg is None or cfg.fixed_amax is not None:
            return False
        return self.role == "weight" or cfg.needs_calibration

    def weight(self):
        """The weight array a weight quantizer quantizes (stacked ``[E, ...]`` for experts)."""
        fn = getattr(self.parent, "weight_of", None)
        if callable(fn):
            w = fn(self.attr)
        else:
            base = self.attr[: -len("_quantizer")] if self.attr.endswith("_quantizer") else self.attr
            w = getattr(self.parent, base, None)
            if w is None:
                w = getattr(self.parent, "weight", None)
        if w is None:
            raise AttributeError(f"no weight found for weight quantizer {self.path}")
        return w.value if hasattr(w, "value") else w


def model_name_map(model: Any):
    """``nnx path -> ModelOpt name`` function for ``model`` (identity without a model config)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "architecture", None):
        try:
            from jaxquant.converters.names import NameMap

            nm = NameMap.for_config(config)
            return nm.hf_name
        except Exception:  # an architecture the name map does not know: plain paths
            pass
    return lambda p: p


def quantizer_sites(model: Any) -> list[Site]:
    """Every ``TensorQuantizer`` of ``model`` as a ``Site``, in natural path order."""
    from jaxquant.recipe.apply import find_quantizers

    to_name = model_name_map(model)
    out = []
    for path, q, parent, base, attr in find_quantizers(model):
        names_fn = getattr(parent, "quantizer_names", None)
        inst = names_fn(attr) if callable(names_fn) and q.instances is not None else None
        if inst:
            names = tuple(to_name(f"{base}.{n}" if base else n) for n in inst)
        else:
            names = (to_name(path),)
        out.append(Site(path, q, parent, attr, names, role_of(attr)))
    return out


__all__ = ["ROLES", "Site", "model_name_map", "quantizer_sites", "role_of"]
