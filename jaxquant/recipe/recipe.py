"""The ``Recipe`` data model and ModelOpt ``quant_cfg`` normalization.

A recipe is ModelOpt's PTQ recipe (spec modelopt.md §1.2-§1.4), already resolved and validated:

* ``metadata``: ``recipe_type`` ("ptq") and ``description``;
* ``algorithm``: the raw calibration algorithm (``"max"``, ``{"method": "max", ...}`` or None) and
  its ``method`` name;
* ``quant_cfg``: an ordered tuple of ``QuantCfgEntry`` rules (ModelOpt's list form). The legacy
  dict form (``{"*weight_quantizer": {...}, "default": {...}, "nn.X": {"*": {...}}}``) is
  converted on load, with ``default`` hoisted to the front as ModelOpt's old code applied it.

``recipe_from_dict`` builds one from the dicts ModelOpt users pass to ``mtq.quantize``
(``{"quant_cfg": [...], "algorithm": "max"}``, ``mtq.NVFP4_DEFAULT_CFG``, the legacy dict form, or a
full recipe mapping with ``metadata`` / ``quantize``). ``load_recipe`` (``loader.py``) reads YAML.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer.config import SUPPORTED_FORMATS, QuantizerConfig
from jaxquant.quantizer.config import _loc, _sub  # the one key-path formatter for error messages
from jaxquant.quantizer.sequential import as_quantizer_config

RECIPE_TYPES = ("ptq", "auto_quantize", "speculative_eagle", "speculative_dflash", "speculative_medusa")
SUPPORTED_RECIPE_TYPES = ("ptq",)
def supported_algorithm_names() -> tuple[str, ...]:
    """The calibration algorithms jaxquant runs (``calibration.algorithms``' registry: one list)."""
    from jaxquant.calibration.algorithms import supported_algorithms

    return supported_algorithms()
DEFAULT_DESCRIPTION = "Model optimization recipe."

_ENTRY_KEYS = ("quantizer_name", "parent_class", "cfg", "enable")
_QUANTIZE_KEYS = ("quant_cfg", "algorithm", "effective_bits")
_RECIPE_KEYS = ("metadata", "quantize", "ptq_cfg", "imports")
_METADATA_KEYS = ("recipe_type", "description")


@dataclasses.dataclass(frozen=True)
class QuantCfgEntry:
    """One rule of a ``quant_cfg`` list (ModelOpt ``QuantizerCfgEntry``).

    Attributes:
      quantizer_name: fnmatch pattern on the full quantizer name.
      parent_class: only quantizers whose owning module has this class name (``"nn.Linear"``).
      cfg: the attributes that fully replace the matched quantizers' attributes; a tuple means a
        sequential (multi-format) quantizer. None for an enable-only toggle.
      enable: the enable flag as written (None = not given; ModelOpt's default is True).
      where: where the rule was written (file and key path), for messages; not compared.
    """

    quantizer_name: str
    parent_class: str | None = None
    cfg: QuantizerConfig | tuple[QuantizerConfig, ...] | None = None
    enable: bool | None = None
    where: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def effective_enable(self) -> bool:
        """The enable state this rule sets (True unless ``enable: false``)."""
        return self.enable is not False

    @property
    def enables(self) -> bool:
        """True for a rule that turns quantizers on (with or without a cfg)."""
        return self.effective_enable

    def describe(self) -> str:
        """Short human-readable form: ``'*mlp*weight_quantizer' -> nvfp4``."""
        sel = repr(self.quantizer_name)
        if self.parent_class:
            sel += f" (parent {self.parent_class})"
        if self.cfg is None:
            return f"{sel} -> {'enable' if self.effective_enable else 'disable'}"
        fmt = ("+".join(c.format for c in self.cfg) if isinstance(self.cfg, tuple)
               else self.cfg.format)
        return f"{sel} -> {fmt if self.effective_enable else f'{fmt} (disabled)'}"

    def to_dict(self, *, exmy: bool = False) -> dict:
        """ModelOpt's list-form dict (``{"quantizer_name", "parent_class"?, "cfg"?, "enable"?}``)."""
        d: dict[str, Any] = {"quantizer_name": self.quantizer_name}
        if self.parent_class is not None:
            d["parent_class"] = self.parent_class
        if self.cfg is not None:
            if isinstance(self.cfg, tuple):
                d["cfg"] = [_cfg_dict(c, exmy) for c in self.cfg]
            else:
                d["cfg"] = _cfg_dict(self.cfg, exmy)
        if self.enable is not None:
            d["enable"] = self.enable
        return d


def _cfg_dict(c: QuantizerConfig, exmy: bool) -> dict:
    d = c.to_dict(exmy=exmy)
    d.pop("enable", None)
    return d


@dataclasses.dataclass(frozen=True)
class RecipeMetadata:
    """ModelOpt ``RecipeMetadataConfig``."""

    recipe_type: str = "ptq"
    description: str = DEFAULT_DESCRIPTION


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A resolved, validated ModelOpt PTQ recipe.

    Attributes:
      metadata: recipe type and description.
      algorithm: the calibration algorithm as written: a name (``"max"``), a mapping with a
        ``method`` key (``{"method": "max", "layerwise": {...}}``) or None (no calibration).
        Treat it as read-only.
      quant_cfg: the ordered rules (list form; legacy dicts converted, ``default`` hoisted).
      source: the file (or ``"<dict>"``) the recipe came from.
      effective_bits: ModelOpt's recipe-level autoquant cost override (unused by PTQ).
    """

    metadata: RecipeMetadata
    algorithm: Any
    quant_cfg: tuple[QuantCfgEntry, ...]
    source: str | None = None
    effective_bits: float | None = None

    @property
    def method(self) -> str | None:
        """The calibration method name: ``"max"``, ``"mse"``, ..., or None (no calibration)."""
        return algorithm_method(self.algorithm)

    @property
    def algorithm_options(self) -> dict:
        """Extra algorithm settings besides ``method`` (empty for a plain name)."""
        if isinstance(self.algorithm, Mapping):
            return {k: copy.deepcopy(v) for k, v in self.algorithm.items() if k != "method"}
        return {}

    @property
    def description(self) -> str:
        return self.metadata.description

    @property
    def name(self) -> str:
        """A short name: the built-in recipe name (``general/ptq/fp8_default-kv_fp8``) or source."""
        from jaxquant.recipe.loader import display_name

        return display_name(self.source)

    def quantize_config(self, *, exmy: bool = False) -> dict:
        """ModelOpt's ``mtq.quantize`` config dict: ``{"quant_cfg": [...], "algorithm": ...}``."""
        return {
            "quant_cfg": [e.to_dict(exmy=exmy) for e in self.quant_cfg],
            "algorithm": copy.deepcopy(self.algorithm),
        }

    def to_dict(self, *, exmy: bool = True) -> dict:
        """The whole recipe as a ModelOpt recipe mapping (``metadata`` + ``quantize``)."""
        q = self.quantize_config(exmy=exmy)
        if self.effective_bits is not None:
            q["effective_bits"] = self.effective_bits
        return {
            "metadata": {"recipe_type": self.metadata.recipe_type,
                         "description": self.metadata.description},
            "quantize": q,
        }

    def to_yaml(self) -> str:
        """The recipe as a self-contained YAML document (list form, no imports)."""
        import yaml

        return yaml.safe_dump(self.to_dict(exmy=True), sort_keys=False, width=100)

    def with_entries(self, entries: Sequence[QuantCfgEntry], *, source: str | None = None,
                     algorithm: Any = dataclasses.MISSING) -> Recipe:
        """A copy with ``entries`` appended to ``quant_cfg`` (later rules win)."""
        return dataclasses.replace(
            self,
            quant_cfg=self.quant_cfg + tuple(entries),
            source=source if source is not None else self.source,
            algorithm=self.algorithm if algorithm is dataclasses.MISSING else algorithm,
        )

    def unsupported(self) -> list[str]:
        """Reasons this recipe cannot run in jaxquant yet (empty when it can)."""
        return unsupported_reasons(self)

    def check_supported(self):
        """Raise ``UnsupportedError`` when the recipe needs something jaxquant lacks.

        Only enabled rules count: an entry with ``enable: false`` may name any format.
        """
        problems = self.unsupported()
        if problems:
            src = f"recipe {self.source}" if self.source else "recipe"
            raise UnsupportedError(
                f"{src} needs features jaxquant does not support yet:\n  - "
                + "\n  - ".join(problems)
                + f"\nSupported formats: {', '.join(SUPPORTED_FORMATS)}; supported calibration "
                f"algorithms: {', '.join(supported_algorithm_names())}."
            )
        return self


# ----------------------------------------------------------------------------------- helpers
def algorithm_method(algorithm: Any) -> str | None:
    """``"max"`` -> ``"max"``; ``{"method": "mse", ...}`` -> ``"mse"``; None -> None."""
    if algorithm is None:
        return None
    if isinstance(algorithm, str):
        return algorithm
    if isinstance(algorithm, Mapping):
        return algorithm.get("method")
    if isinstance(algorithm, (list, tuple)):
        return "+".join(str(algorithm_method(a)) for a in algorithm)
    return str(algorithm)


def unsupported_reasons(recipe: Recipe) -> list[str]:
    out = []
    algo = recipe.algorithm
    # null (no calibration, as ModelOpt's mxfp8 preset): fine when every quantizer is dynamic or constant;
    # jaxquant.quantize names the quantizer otherwise, once the model's quantizers are known; a list: each element
    for method in ([algorithm_method(a) for a in algo] if isinstance(algo, (list, tuple)) else [recipe.method]):
        if method is not None and method not in supported_algorithm_names():
            out.append(f"calibration algorithm {method!r}")
    for i, e in enumerate(recipe.quant_cfg):
        if e.cfg is None or not e.effective_enable:
            continue
        at = loc(e.where) if e.where else f"quant_cfg[{i}]"
        reason = as_quantizer_config(e.cfg).replace(enable=True).unsupported_reason
        if reason is not None:
            out.append(f"{at}: {e.quantizer_name!r} uses {reason}")
    return out


def _where(node: Any, fallback: str) -> str:
    return getattr(node, "where", None) or fallback


def loc(where: str) -> str:
    """``where`` for a message: a file root (``"f.yaml: "``) prints as ``"f.yaml"``."""
    return _loc(where)


def child_where(where: str, key: Any) -> str:
    """``"f.yaml: quantize"`` + ``"algorithm"`` -> ``"f.yaml: quantize.algorithm"``; an int key
    gives ``[i]``; the root (``"f.yaml: "``) takes the key without a dot."""
    return _sub(where, key)


def parse_entry(raw: Any, where: str) -> QuantCfgEntry:
    """Validate one list-form entry (``{quantizer_name, parent_class?, cfg?, enable?}``).

    Follows ModelOpt's ``QuantizerCfgEntry`` rules: ``quantizer_name`` is required, the entry
    needs ``cfg`` or ``enable``, an empty ``cfg`` is dropped when ``enable: false`` and rejected
    otherwise. As in ModelOpt, the entry-level ``enable`` (default True) decides the enabled state
    of a ``cfg`` rule; an ``enable`` key inside ``cfg`` is overridden.
    """
    where = _where(raw, where)
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{loc(where)}: a quant_cfg entry must be a mapping, got {raw!r}")
    unknown = [k for k in raw if k not in _ENTRY_KEYS]
    if unknown:
        raise RecipeError(
            f"{child_where(where, unknown[0])}: unknown quant_cfg entry key; known: {', '.join(_ENTRY_KEYS)}"
        )
    name = raw.get("quantizer_name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{child_where(where, 'quantizer_name')}: required, a non-empty string pattern; got {name!r}")
    parent = raw.get("parent_class")
    if parent is not None and not isinstance(parent, str):
        raise RecipeError(f"{child_where(where, 'parent_class')}: must be a class name string, got {parent!r}")
    enable = raw.get("enable")
    if "enable" in raw and not isinstance(enable, bool):
        raise RecipeError(f"{child_where(where, 'enable')}: must be true or false, got {enable!r}")
    if "cfg" not in raw and "enable" not in raw:
        raise RecipeError(
            f"{loc(where)}: entry for {name!r} has neither 'cfg' nor 'enable' (it would do nothing)"
        )
    cfg_raw = raw.get("cfg")
    cfg_where = _where(cfg_raw, f"{child_where(where, 'cfg')}")
    empty = (isinstance(cfg_raw, Mapping) and not cfg_raw) or (
        isinstance(cfg_raw, (list, tuple))
        and all(isinstance(c, Mapping) and not c for c in cfg_raw)
    )
    if empty:
        if enable is False:
            cfg_raw = None
        else:
            raise RecipeError(
                f"{cfg_where}: empty cfg for {name!r}; give the format, or drop cfg and use enable"
            )
    eff = enable is not False
    cfg: QuantizerConfig | tuple[QuantizerConfig, ...] | None
    if cfg_raw is None:
        cfg = None
        if "cfg" in raw and enable is None:
            raise RecipeError(f"{cfg_where}: cfg is null and no enable is given for {name!r}")
    elif isinstance(cfg_raw, (list, tuple)):
        cfg = tuple(
            QuantizerConfig.from_dict(_dump(c), _where(c, f"{cfg_where}[{j}]")).replace(enable=eff)
            for j, c in enumerate(cfg_raw)
        )
    else:
        cfg = QuantizerConfig.from_dict(_dump(cfg_raw), cfg_where).replace(enable=eff)
    return QuantCfgEntry(name, parent, cfg, enable if "enable" in raw else None, where=where)


def _dump(x: Any) -> Any:
    """Pydantic models (ModelOpt's own config objects) -> plain dicts."""
    if hasattr(x, "model_dump") and not isinstance(x, Mapping):
        return x.model_dump()
    return x


def _legacy_pair(key: Any, value: Any, where: str) -> list[dict]:
    """One legacy ``{pattern: attrs}`` pair -> list-form entry dicts (ModelOpt's conversion)."""
    if key == "default":
        key = "*"
    if not isinstance(key, str):
        raise RecipeError(f"{loc(where)}: legacy quant_cfg keys must be strings, got {key!r}")
    value = _dump(value)
    if key.startswith("nn."):
        if not isinstance(value, Mapping):
            raise RecipeError(
                f"{loc(where)}: a class-scoped key {key!r} needs a mapping {{pattern: attrs}}, got {value!r}"
            )
        out = []
        for pattern, sub in value.items():
            sub = _dump(sub)
            if not isinstance(sub, Mapping):
                raise RecipeError(f"{child_where(where, pattern)}: expected a mapping of attributes, got {sub!r}")
            e = {"quantizer_name": pattern, "parent_class": key}
            rest = {k: v for k, v in sub.items() if k != "enable"}
            if rest:
                e["cfg"] = _keep_where(sub, rest)
            if "enable" in sub:
                e["enable"] = sub["enable"]
            out.append(_keep_where(value, e, f"{child_where(where, pattern)}"))
        return out
    e: dict[str, Any] = {"quantizer_name": key}
    if isinstance(value, Mapping):
        rest = {k: v for k, v in value.items() if k != "enable"}
        if rest:
            e["cfg"] = _keep_where(value, rest)
        if "enable" in value:
            e["enable"] = value["enable"]
    elif isinstance(value, (list, tuple)):
        e["cfg"] = value
    else:
        raise RecipeError(f"{loc(where)}: expected a mapping of quantizer attributes, got {value!r}")
    return [_keep_where(value, e, where)]


class _WhereDict(dict):
    """A dict that remembers where it was written (file and key path)."""

    where: str | None = None


def _keep_where(src: Any, d: dict, where: str | None = None) -> dict:
    out = _WhereDict(d)
    out.where = where or getattr(src, "where", None)
    return out


def normalize_quant_cfg(raw: Any, where: str = "quant_cfg") -> tuple[QuantCfgEntry, ...]:
    """Any ModelOpt ``quant_cfg`` spelling -> validated list-form rules.

    * a list of list-form entries (current ModelOpt);
    * a legacy flat dict (pre-0.44 recipes, old ``mtq.*_CFG``): ``default`` is **hoisted to the
      front** (the old ``set_quantizer_by_cfg`` applied it first wherever it sat), the other keys
      follow in order; ``nn.X: {pattern: attrs}`` becomes ``parent_class`` rules;
    * a list mixing list-form entries and legacy single-key dicts (ModelOpt's transitional form;
      here ``default`` keeps its position, as in ModelOpt's ``normalize_quant_cfg_list``).

    Note the legacy form *merged* attributes while the list form *replaces* them; legacy configs
    are read with the list-form semantics, which is how ModelOpt reads them today.
    """
    where = _where(raw, where)
    raw = _dump(raw)
    entries: list[tuple[Any, str]] = []
    if isinstance(raw, Mapping):
        items = list(raw.items())
        defaults = [(k, v) for k, v in items if k == "default"]
        others = [(k, v) for k, v in items if k != "default"]
        for k, v in defaults + others:
            for e in _legacy_pair(k, v, f"{child_where(where, k)}"):
                entries.append((e, _where(e, f"{child_where(where, k)}")))
    elif isinstance(raw, (list, tuple)):
        for i, item in enumerate(raw):
            item = _dump(item)
            at = _where(item, f"{where}[{i}]")
            if isinstance(item, Mapping) and "quantizer_name" in item:
                entries.append((item, at))
            elif isinstance(item, Mapping) and len(item) == 1 and next(iter(item)) in _ENTRY_KEYS:
                raise RecipeError(
                    f"{child_where(at, 'quantizer_name')}: required, a non-empty string pattern"
                )
            elif isinstance(item, Mapping) and len(item) == 1:
                (k, v), = item.items()
                for e in _legacy_pair(k, v, at):
                    entries.append((e, at))
            elif isinstance(item, Mapping) and any(str(k).startswith("nn.") for k in item):
                for k, v in item.items():
                    for e in _legacy_pair(k, v, f"{at}.{k}"):
                        entries.append((e, at))
            else:
                raise RecipeError(
                    f"{at}: not a quant_cfg entry (expected {{quantizer_name: ..., cfg/enable: ...}}), "
                    f"got {item!r}"
                )
    else:
        raise RecipeError(
            f"{loc(where)}: quant_cfg must be a list of entries (or a legacy mapping), got "
            f"{type(raw).__name__}"
        )
    return tuple(parse_entry(e, at) for e, at in entries)


def parse_algorithm(raw: Any, where: str) -> Any:
    """Validate ``algorithm``: a method name, a mapping with ``method``, a list of those, or null."""
    raw = _dump(raw)
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, Mapping):
        if not isinstance(raw.get("method"), str):
            raise RecipeError(f"{child_where(where, 'method')}: required (the algorithm name), got {raw.get('method')!r}")
        return copy.deepcopy(dict(raw))
    if isinstance(raw, (list, tuple)):
        return [parse_algorithm(a, f"{where}[{i}]") for i, a in enumerate(raw)]
    raise RecipeError(f"{loc(where)}: must be a name like 'max', a mapping with 'method', or null; got {raw!r}")


def parse_quantize(raw: Any, where: str, *, source: str | None,
                   metadata: RecipeMetadata | None = None) -> Recipe:
    """A ``QuantizeConfig`` mapping (``{quant_cfg, algorithm?, effective_bits?}``) -> ``Recipe``."""
    where = _where(raw, where)
    raw = _dump(raw)
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{loc(where)}: must be a mapping with quant_cfg and algorithm, got {raw!r}")
    unknown = [k for k in raw if k not in _QUANTIZE_KEYS]
    if unknown:
        raise RecipeError(
            f"{child_where(where, unknown[0])}: unknown key; known: {', '.join(_QUANTIZE_KEYS)}"
        )
    if "quant_cfg" not in raw or raw["quant_cfg"] is None:
        raise RecipeError(f"{loc(where)}: quant_cfg is missing")
    quant_cfg = normalize_quant_cfg(raw["quant_cfg"], child_where(where, "quant_cfg"))
    algorithm = (parse_algorithm(raw["algorithm"], child_where(where, "algorithm"))
                 if "algorithm" in raw else "max")
    eb = raw.get("effective_bits")
    if eb is not None and (isinstance(eb, bool) or not isinstance(eb, (int, float)) or not 0 < eb <= 16):
        raise RecipeError(f"{child_where(where, 'effective_bits')}: must be a number in (0, 16], got {eb!r}")
    return Recipe(
        metadata=metadata or RecipeMetadata(),
        algorithm=algorithm,
        quant_cfg=quant_cfg,
        source=source,
        effective_bits=float(eb) if eb is not None else None,
    )


def parse_metadata(raw: Any, where: str) -> RecipeMetadata:
    where = _where(raw, where)
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{loc(where)}: must be a mapping with recipe_type and description, got {raw!r}")
    unknown = [k for k in raw if k not in _METADATA_KEYS]
    if unknown:
        raise RecipeError(
            f"{child_where(where, unknown[0])}: unknown key; known: {', '.join(_METADATA_KEYS)}"
        )
    rtype = raw.get("recipe_type")
    rtype = getattr(rtype, "value", rtype)  # ModelOpt's RecipeType enum
    if rtype not in RECIPE_TYPES:
        raise RecipeError(
            f"{child_where(where, 'recipe_type')}: must be one of {', '.join(RECIPE_TYPES)}, got {rtype!r}"
        )
    if rtype not in SUPPORTED_RECIPE_TYPES:
        raise UnsupportedError(
            f"{child_where(where, 'recipe_type')}: {rtype!r} recipes are not supported yet; supported: "
            f"{', '.join(SUPPORTED_RECIPE_TYPES)}"
        )
    desc = raw.get("description", DEFAULT_DESCRIPTION)
    if not isinstance(desc, str):
        raise RecipeError(f"{child_where(where, 'description')}: must be a string, got {desc!r}")
    return RecipeMetadata(recipe_type=rtype, description=" ".join(desc.split()))


def parse_recipe_mapping(raw: Any, source: str | None, where: str) -> Recipe:
    """A full recipe mapping (``metadata`` + ``quantize`` or legacy ``ptq_cfg``) -> ``Recipe``."""
    where = _where(raw, where)
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{loc(where)}: a recipe must be a mapping, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in _RECIPE_KEYS]
    if unknown:
        raise RecipeError(f"{child_where(where, unknown[0])}: unknown top-level key; known: "
                          f"{', '.join(k for k in _RECIPE_KEYS if k != 'imports')}")
    if "metadata" not in raw:
        raise RecipeError(f"{loc(where)}: missing 'metadata' (recipe_type: ptq, description: ...)")
    meta = parse_metadata(raw["metadata"], child_where(where, "metadata"))
    if "quantize" in raw and "ptq_cfg" in raw:
        raise RecipeError(f"{loc(where)}: both 'quantize' and the legacy 'ptq_cfg' are given; keep one")
    key = "quantize" if "quantize" in raw else "ptq_cfg" if "ptq_cfg" in raw else None
    if key is None:
        raise RecipeError(f"{loc(where)}: a PTQ recipe must contain 'quantize'")
    return parse_quantize(raw[key], child_where(where, key), source=source, metadata=meta)


def recipe_from_dict(d: Any, source: str = "<dict>", *, check_supported: bool = True) -> Recipe:
    """Build a ``Recipe`` from a ModelOpt-style Python config.

    Accepts ``{"quant_cfg": [...], "algorithm": "max"}`` (``mtq.quantize`` configs such as
    ``mtq.FP8_DEFAULT_CFG``), the legacy dict form of ``quant_cfg``, a full recipe mapping
    (``{"metadata": ..., "quantize": ...}``, ``$import`` allowed against the built-in recipe
    folder), a bare list of entries (algorithm ``max``), or an existing ``Recipe``.

    Args:
      d: the config.
      source: a label used in error messages and as ``Recipe.source``.
      check_supported: raise ``UnsupportedError`` when an enabled rule needs a format (or the
        recipe an algorithm) jaxquant does not implement yet.

    Raises:
      RecipeError: invalid config (the message names ``source`` and the key path).
      UnsupportedError: see ``check_supported``.
    """
    if isinstance(d, Recipe):
        recipe = d
    else:
        d = _dump(d)
        if isinstance(d, Mapping) and ("imports" in d or _has_import(d)):
            from jaxquant.recipe.loader import resolve_imports_in_data

            d = resolve_imports_in_data(d, source)
        if isinstance(d, Mapping) and ("metadata" in d or "quantize" in d or "ptq_cfg" in d):
            recipe = parse_recipe_mapping(d, source, f"{source}: ")
        elif isinstance(d, Mapping) and "quant_cfg" in d:
            recipe = parse_quantize(d, f"{source}: ", source=source)
        elif isinstance(d, (list, tuple)):
            recipe = Recipe(RecipeMetadata(), "max", normalize_quant_cfg(d, f"{source}: quant_cfg"),
                            source=source)
        else:
            raise RecipeError(
                f"{source}: expected a recipe mapping, a quantize config with 'quant_cfg', or a "
                f"list of quant_cfg entries; got {type(d).__name__}"
            )
    if check_supported:
        recipe.check_supported()
    return recipe


def _has_import(obj: Any) -> bool:
    if isinstance(obj, Mapping):
        return "$import" in obj or any(_has_import(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_import(v) for v in obj)
    return False
