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
    def is_table(self) -> bool:
        """The weight quantizer of a token embedding table (parent ``nn.Embedding``). Not a GEMM: the passes that
        work on a linear's activations (SmoothQuant, AWQ, SVDQuant, GPTQ, local Hessian) skip it, as ModelOpt's
        ``is_quantized_linear`` does, and its amax stays the max calibration's (MSE, and local Hessian for weights
        without a Hessian, search it with the squared error, as ModelOpt does)."""
        return self.role == "weight" and getattr(self.parent, "modelopt_class", None) == "nn.Embedding"

    @property
    def is_gemm_weight(self) -> bool:
        """A linear's weight quantizer (not a token table's): what the activation-aware passes work on."""
        return self.role == "weight" and not self.is_table

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

    @property
    def parent_path(self) -> str:
        """The dotted NNX path of ``parent``."""
        return self.path[: -len(self.attr) - 1] if self.path.endswith("." + self.attr) else ""

    @property
    def module_names(self) -> tuple[str, ...]:
        """ModelOpt module names, one per instance: ``names`` without the quantizer attribute
        (``model.layers.3.self_attn.q_proj``, ``...experts.7.gate_proj``)."""
        return tuple(n.rpartition(".")[0] for n in self.names)

    @property
    def weight_param(self) -> str:
        """The attribute of ``parent`` holding the parameter a weight quantizer quantizes
        (``"weight"``; ``"kernel"`` for a user's ``nnx.Linear``; ``"gate_proj"`` for stacked experts).

        From the owning module's ``weight_param_name(attr)`` when it defines one, else the
        attribute named like the quantizer without ``_quantizer``, else ``"weight"``."""
        fn = getattr(self.parent, "weight_param_name", None)
        if callable(fn):
            return fn(self.attr)
        base = self.attr[: -len("_quantizer")] if self.attr.endswith("_quantizer") else self.attr
        return base if getattr(self.parent, base, None) is not None else "weight"

    @property
    def weight_path(self) -> str:
        """The dotted NNX path of the parameter behind ``weight()``."""
        return f"{self.parent_path}.{self.weight_param}" if self.parent_path else self.weight_param

    def weight(self):
        """The weight a weight quantizer quantizes, in the layout it sees (torch's ``[out, in]``;
        stacked ``[E, out, in]`` for experts): the owning module's ``weight_of(attr)`` when it
        defines one (a user's ``nnx.Linear`` returns ``kernel.T``), else ``weight_param``'s value."""
        fn = getattr(self.parent, "weight_of", None)
        w = fn(self.attr) if callable(fn) else getattr(self.parent, self.weight_param, None)
        if w is None:
            raise AttributeError(f"no weight found for weight quantizer {self.path}")
        return w.value if hasattr(w, "value") else w


def model_name_map(model: Any):
    """``nnx path -> ModelOpt name`` function for ``model`` (identity without a model config)."""
    from jaxquant.recipe.apply import default_name_map

    return default_name_map(model)


def quantizer_sites(model: Any, name_map=None) -> list[Site]:
    """Every ``TensorQuantizer`` of ``model`` as a ``Site``, in natural path order.

    ``name_map``: NNX path -> ModelOpt name (default ``model_name_map(model)``)."""
    from jaxquant.recipe.apply import find_quantizers

    to_name = name_map or model_name_map(model)
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
