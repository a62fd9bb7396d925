"""Apply a recipe to an NNX model: configure every ``TensorQuantizer`` in it.

Names: a quantizer's name is its dotted NNX path with list indices as plain numbers
(``model.layers.3.self_attn.q_proj.input_quantizer``), which is ModelOpt's name for the same
site when the model mirrors the HF module tree. The parent class a ``parent_class`` rule sees is
``parent.modelopt_class`` when the owning module defines it (our Linear says ``"nn.Linear"``,
embeddings ``"nn.Embedding"``), else the Python class name.

Protocol for stacked modules (MoE experts stored as one ``[E, ...]`` tensor). The owning module
may define:

* ``quantizer_names(attr_name) -> list[str] | None``: the ModelOpt names of the instances behind
  the quantizer attribute ``attr_name``, relative to the module's path, one per instance
  (``["experts.0.gate_proj.weight_quantizer", ...]``). Every instance is resolved, and they must
  all resolve to the same config (a stacked quantizer has one format); the report lists them
  per instance.
* ``quantizer_tensor_shape(attr_name) -> tuple | None``: the shape of the tensor the quantizer
  sees (for per-channel / static-block amax). Without it a ``weight_quantizer`` uses
  ``parent.weight``'s shape when there is one.
* ``constant_amax_of(attr_name) -> float | None``: an amax calibration never sets, pinned as the
  config's ``constant_amax`` (attention's ``p_bmm_quantizer``: 1.0).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer.config import SUPPORTED_FORMATS
from jaxquant.quantizer.sequential import as_quantizer_config
from jaxquant.quantizer.tensor_quantizer import TensorQuantizer
from jaxquant.recipe.matcher import (
    QuantizerSite,
    Resolution,
    _as_rules,
    format_name,
    fused_expert_name,
    resolve,
    warn_unmatched,
)


def _aliases(name: str) -> tuple[str, ...]:
    """Other names rules may match the quantizer ``name`` by: ModelOpt's fused-experts name (``fused_expert_name``)."""
    fused = fused_expert_name(name)
    return () if fused is None else (fused,)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def parent_class_of(module: Any) -> str:
    """The class name ``parent_class`` rules compare against."""
    return getattr(module, "modelopt_class", None) or type(module).__name__


_TABLES: contextvars.ContextVar[dict[int, tuple[Any, dict]] | None] = contextvars.ContextVar("jaxquant_module_tables",
                                                                                           default=None)


@contextlib.contextmanager
def same_structure() -> Iterator[None]:
    """Within this block (on this thread) the models' module trees do not change, so ``module_table`` walks each
    model once: an export plan asks for its quantizers from several places (checks, the walk, the sites)."""
    token = _TABLES.set({})
    try:
        yield
    finally:
        _TABLES.reset(token)


def module_table(model: Any) -> dict[tuple, Any]:
    """``{nnx path tuple: module}`` for every module of ``model`` (``models.walk.iter_modules``, NNX's order),
    walked once per ``same_structure()`` block."""
    from jaxquant.models.walk import iter_modules

    tables = _TABLES.get()
    hit = None if tables is None else tables.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]
    table = {tuple(p): m for p, m in iter_modules(model)}
    if tables is not None:
        tables[id(model)] = (model, table)
    return table


def find_quantizers(model: Any) -> list[tuple[str, TensorQuantizer, Any, str, str]]:
    """``(path, quantizer, parent module, parent path, attribute name)`` for every
    ``TensorQuantizer``, in natural path order. The parent is the nearest enclosing module; the
    attribute name is the quantizer's path below it (``"weight_quantizer"``)."""
    modules = module_table(model)
    out = []
    for path, m in modules.items():
        if not isinstance(m, TensorQuantizer):
            continue
        if not path:
            raise RecipeError("the model itself is a TensorQuantizer; pass the model that owns it")
        k = len(path) - 1
        while k > 0 and (path[:k] not in modules or isinstance(modules[path[:k]], TensorQuantizer)):
            k -= 1
        parent = modules[path[:k]]
        out.append((_path_str(path), m, parent, _path_str(path[:k]), _path_str(path[k:])))
    out.sort(key=lambda t: _natural_key(t[0]))
    return out


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _tensor_shape(parent: Any, attr: str, cfg: Any = None) -> tuple | None:
    bmm = getattr(parent, "bmm_tensor_shape", None)
    if callable(bmm) and getattr(cfg, "bias", None) is not None:  # affine K/V: the per-head bias needs heads, D
        shape = bmm(attr)
        return tuple(shape) if shape is not None else None
    fn = getattr(parent, "quantizer_tensor_shape", None)
    if callable(fn):
        shape = fn(attr)
        return tuple(shape) if shape is not None else None
    if attr == "weight_quantizer":
        w = getattr(parent, "weight", None)
        if w is not None:
            shape = getattr(getattr(w, "value", w), "shape", None)
            if shape is not None:
                return tuple(shape)
    return None


class EmbeddingNotQuantizedWarning(UserWarning):
    """The recipe would quantize something of a token embedding in ModelOpt that jaxquant's embedding does not hold
    a quantizer for (its lookup output; the table of an embedding module without a ``weight_quantizer``)."""


#: ModelOpt's quantizers of an ``nn.Embedding`` (``QuantEmbedding``) that can be enabled; its ``input_quantizer``
#: (the token ids) is hard-disabled whatever a recipe says.
_EMBEDDING_QUANTIZERS = ("weight_quantizer", "output_quantizer")


def _warn_quantized_embeddings(rules: Any, model: Any, to_name: Callable[[str], str]) -> None:
    """ModelOpt gives every ``nn.Embedding`` (not Gemma's scaled embeddings) a weight and an output quantizer. The
    table's is jaxquant's ``Embedding.weight_quantizer``; a recipe that enables one jaxquant's module does not hold
    (the lookup output; the table of a user's embedding without a ``weight_quantizer``) leaves it unquantized here
    while ModelOpt would quantize it: said here, loudly, not silently."""
    emb = [to_name(f"{'.'.join(map(str, p))}.{attr}") for p, m in module_table(model).items()
           if getattr(m, "modelopt_class", None) == "nn.Embedding" and getattr(m, "scale", None) is None
           for attr in _EMBEDDING_QUANTIZERS if not isinstance(getattr(m, attr, None), TensorQuantizer)]
    if not emb:
        return
    got = resolve(rules, [QuantizerSite(n, "nn.Embedding") for n in emb]).configs
    on = [n for n in emb if got.get(n) is not None and got[n].enable]
    if on:
        warnings.warn(
            f"the recipe enables {on[0]} ({format_name(got[on[0]])}): ModelOpt would quantize it; jaxquant's "
            "embedding holds no such quantizer, so it stays unquantized. Add the rule {quantizer_name: '*', "
            "parent_class: nn.Embedding, enable: false} (ModelOpt's default_disabled_quantizers unit has it) to "
            "say so in the recipe.", EmbeddingNotQuantizedWarning, stacklevel=3)


def _refuse_quantized_tied_table(model: Any, found: list, per_quantizer: dict) -> None:
    """A tied model (``lm_head`` None: the head reads the embedding table) whose table the recipe quantizes is
    refused: ModelOpt quantizes its tied ``lm_head`` with a quantizer of its own and 0.47 then writes
    ``embed_tokens`` unquantized while listing it as quantized (checked on a tied Llama), which jaxquant cannot
    reproduce as a loadable checkpoint."""
    if getattr(model, "lm_head", "absent") is not None:
        return
    for path, _q, parent, _base, attr in found:
        cfg = per_quantizer.get(path)
        if parent_class_of(parent) == "nn.Embedding" and attr == "weight_quantizer" and cfg is not None \
                and cfg.enable:
            raise UnsupportedError(
                f"quantizer {path} ({format_name(cfg)}): the recipe quantizes the token embedding of a model with "
                "tied embeddings (the output head reads the same table). ModelOpt 0.47 quantizes its tied lm_head "
                "separately and exports embed_tokens unquantized while declaring it quantized; jaxquant does not "
                "write that checkpoint. Add the rule {quantizer_name: '*', parent_class: nn.Embedding, enable: "
                "false} to the recipe, or untie the embeddings.")


def _with_constant_amax(parent: Any, attr: str, cfg: Any) -> Any:
    """``cfg`` with the parent's ``constant_amax_of(attr)`` pinned when calibration never sets that quantizer's
    amax (the softmax probabilities: ModelOpt quantizes them only inside its attention kernel, with amax 1.0
    unless one is given). A config with a constant amax of its own, dynamic or sequential, is kept."""
    fn = getattr(parent, "constant_amax_of", None)
    if cfg is None or not cfg.enable or not callable(fn) or not hasattr(cfg, "constant_amax"):
        return cfg
    amax = fn(attr)
    if amax is None or not cfg.needs_calibration:
        return cfg
    return dataclasses.replace(cfg, constant_amax=float(amax))


def default_name_map(model: Any) -> Callable[[str], str]:
    """NNX path -> ModelOpt (HF) name for ``model``: our decoders keep a text-only tree under
    ``model.`` while HF multimodal checkpoints put it under e.g. ``model.language_model.``; the
    converters' ``NameMap`` knows the prefix. Identity for models without a jaxquant config."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "architecture", None):
        try:
            from jaxquant.converters.names import NameMap

            return NameMap.for_config(config).hf_name
        except Exception:  # an architecture the name map does not know: plain paths
            pass
    return lambda p: p


def apply_recipe(model: Any, recipe: Any, *, strict: bool | str = False, warn: bool = True,
                 name_map: Callable[[str], str] | None = None) -> Resolution:
    """Resolve ``recipe`` on ``model``'s quantizers and configure each of them.

    Args:
      model: an NNX module tree holding ``TensorQuantizer`` modules.
      recipe: a ``Recipe``, a recipe name / path, or a ModelOpt-style config dict.
      strict: True: a rule that enables or configures quantizers but matches none is a
        ``RecipeError``; ``"all"``: any unmatched rule is (exclusions for modules this model
        lacks included); False: unmatched enabling rules only warn.
      warn: emit a warning for unmatched enabling rules when not strict.
      name_map: NNX path -> ModelOpt name; default ``default_name_map(model)`` (the HF name of
        jaxquant's decoders, identity otherwise). Rules match the mapped names.

    Returns:
      The ``Resolution`` (``report()`` prints the quantizer -> format table). ``configs`` is keyed
      by ModelOpt name (per instance for stacked experts); ``quantizers`` maps each
      ``TensorQuantizer``'s NNX path to its config and ``names`` to its ModelOpt name(s).

    Raises:
      UnsupportedError: an enabled quantizer resolves to a format jaxquant does not implement
        (the message names it), or the instances of a stacked quantizer resolve differently.
      RecipeError: unmatched rules under ``strict``.
    """
    rules, rec = _as_rules(recipe)
    found = find_quantizers(model)
    if not found:
        raise RecipeError("the model has no TensorQuantizer modules to configure")

    to_name = name_map or default_name_map(model)
    sites: list[QuantizerSite] = []
    names: dict[str, tuple[str, ...]] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for path, _q, parent, base, attr in found:
        cls = parent_class_of(parent)
        names_fn = getattr(parent, "quantizer_names", None)
        inst = names_fn(attr) if callable(names_fn) else None
        if inst:
            full = tuple(to_name(f"{base}.{n}" if base else n) for n in inst)
            groups[path] = full
        else:
            full = (to_name(path),)
        names[path] = full
        sites.extend(QuantizerSite(n, cls, aliases=_aliases(n)) for n in full)
    res = resolve(rules, sites)
    res.recipe = rec
    if warn:
        _warn_quantized_embeddings(rules, model, to_name)

    per_quantizer: dict[str, Any] = {}
    for path, _q, parent, *_ in found:
        if getattr(parent, "modelopt_quantizers", True) is False:
            per_quantizer[path] = None  # ModelOpt attaches no quantizer there (module doc of its class)
            res.configs.update((n, None) for n in names[path])
            continue
        cfgs = {n: res.configs[n] for n in names[path]}
        distinct = set(cfgs.values())
        if len(distinct) > 1:
            by_fmt: dict[str, list[str]] = {}
            for n, c in cfgs.items():
                by_fmt.setdefault(format_name(c) or "disabled", []).append(n)
            detail = "; ".join(f"{f}: {', '.join(ns[:4])}{' ...' if len(ns) > 4 else ''}"
                               for f, ns in by_fmt.items())
            if len(by_fmt) == 1:
                detail += " (same format, different attributes)"
            raise UnsupportedError(
                f"quantizer {path} holds {len(cfgs)} stacked instances, and the recipe gives "
                f"them different configs ({detail}); jaxquant quantizes stacked experts with "
                "one config"
            )
        per_quantizer[path] = as_quantizer_config(next(iter(distinct)))  # a sequential chain as one config
    res.quantizers = per_quantizer
    res.instances = groups
    res.names = names

    bad = []
    for path, cfg in per_quantizer.items():
        if cfg is None:
            continue
        if cfg.unsupported_reason is not None:
            bad.append(f"{path}: {cfg.unsupported_reason}")
    if bad:
        more = f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise UnsupportedError(
            f"{len(bad)} quantizer(s) resolve to something jaxquant does not support yet:\n  - "
            + "\n  - ".join(bad[:8]) + more
            + f"\nSupported formats: {', '.join(SUPPORTED_FORMATS)}."
        )

    _refuse_quantized_tied_table(model, found, per_quantizer)
    res.check_unmatched(strict)
    if warn and not strict:
        warn_unmatched(res, stacklevel=3)

    for path, q, parent, _base, attr in found:
        cfg = per_quantizer[path]
        if cfg is None and names[path][0] in res.disabled_rotating:  # disabled, but rotates its input
            cfg = res.disabled_rotating[names[path][0]]
        shape = _tensor_shape(parent, attr, cfg) if cfg is not None and cfg.enable else None
        cfg = _with_constant_amax(parent, attr, cfg)
        try:
            q.configure(cfg, tensor_shape=shape)
        except UnsupportedError as e:
            raise UnsupportedError(f"quantizer {path}: {e}") from None
        except ValueError as e:
            raise UnsupportedError(f"quantizer {path} ({format_name(cfg)}): {e}") from None
    return res
