"""Loading ModelOpt YAML recipes: name resolution, ``imports`` / ``$import``, validation.

Mechanics follow ModelOpt's ``modelopt/torch/opt/config_loader.py`` and ``modelopt/recipe/loader.py``
(spec modelopt.md §1.2):

* ``load_recipe("general/ptq/nvfp4_default-kv_fp8")`` looks in the built-in recipe folder first
  (the ``jaxquant_recipes`` package, the repository's ``recipes/``), then on the filesystem; the
  ``.yaml`` / ``.yml`` suffix is optional. A directory holding ``metadata.yaml`` and
  ``quantize.yaml`` is a recipe too.
* A file declares ``imports: {name: path}``; ``{$import: name}`` as the only key of a list element
  splices a list snippet (schema ``QuantizerCfgListConfig``) or appends one entry
  (``QuantizerCfgEntry``); inside a mapping it merges the imported mapping(s) and lets the inline
  keys override them (``cfg: {$import: fp8, use_constant_amax: true}``). Every imported file
  declares its schema in a ``# modelopt-schema: modelopt.torch.quantization.config.<Type>``
  comment. A list snippet with imports is two YAML documents: ``imports:``, ``---``, the list.
* Import paths are looked up under the *recipe roots*: the directory of the top-level recipe (when
  it is a user file), any ``roots=`` given, then the built-in folder. A path that resolves outside
  every root, a missing import and an import cycle are errors. (ModelOpt looks in the current
  directory instead of the recipe's directory; jaxquant never reads outside the roots.)

Every error names the file and the key path (``recipe.yaml: quantize.quant_cfg[3].cfg.num_bits``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer.config import QuantizerConfig
from jaxquant.recipe.recipe import (
    Recipe,
    child_where,
    loc,
    normalize_quant_cfg,
    parse_entry,
    parse_metadata,
    parse_quantize,
    parse_recipe_mapping,
)

_SUFFIXES = (".yaml", ".yml")
_SCHEMA_RE = re.compile(r"^\s*#\s*modelopt-schema:\s*(\S+)\s*$")
_SCHEMA_PREFIXES = ("modelopt.torch.quantization.config.",)
# Schema types a snippet may declare, by their short name.
SCHEMAS = ("QuantizerAttributeConfig", "QuantizerCfgEntry", "QuantizerCfgListConfig", "QuantizeConfig")
_IMPORT = "$import"

# ModelOpt built-in general/ptq recipes that jaxquant does not ship, and why.
_NOT_SHIPPED = {
    "general/ptq/nvfp4_default-kv_none-gptq": "GPTQ calibration and static NVFP4 weights",
    "general/ptq/nvfp4_act_headroom-kv_fp8_cast": "the nvfp4_act_headroom calibration algorithm",
    "general/ptq/nvfp4_experts_only_input_scale1-kv_fp8_cast":
        "skip_forward_without_activation_calib calibration",
}


def builtin_root() -> Path:
    """The built-in recipe folder (the installed ``jaxquant_recipes`` package)."""
    import jaxquant_recipes

    return Path(jaxquant_recipes.__file__).resolve().parent


def display_name(path: str | os.PathLike | None) -> str:
    """A built-in file's name relative to the built-in folder (no suffix), else the path."""
    if path is None:
        return "<recipe>"
    p = Path(path)
    try:
        rel = p.resolve().relative_to(builtin_root())
    except (ValueError, OSError):
        return str(path)
    s = rel.as_posix()
    for suf in _SUFFIXES:
        if s.endswith(suf):
            return s[: -len(suf)]
    return s


def _display(path: Path) -> str:
    try:
        return "<builtin>/" + path.resolve().relative_to(builtin_root()).as_posix()
    except ValueError:
        return str(path)


def list_recipes(prefix: str = "general/ptq") -> list[str]:
    """Names of the built-in recipes under ``prefix`` (e.g. ``general/ptq/fp8_default-kv_fp8``)."""
    root = builtin_root()
    base = root / prefix
    if not base.is_dir():
        return []
    out = []
    for p in sorted(base.rglob("*")):
        if p.suffix in _SUFFIXES and p.is_file():
            out.append(p.relative_to(root).with_suffix("").as_posix())
    return out


# ------------------------------------------------------------------------------ YAML reading
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (YAML would silently keep the last)."""


def _construct_mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in keys
        except TypeError:
            dup = False
        if dup:
            raise RecipeError(
                f"line {key_node.start_mark.line + 1}: duplicate key {key!r} in the same mapping"
            )
        try:
            keys.add(key)
        except TypeError:
            pass
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _LocDict(dict):
    """A mapping that remembers its file and key path (``where``)."""

    where: str | None = None


class _LocList(list):
    """A list that remembers its file and key path (``where``)."""

    where: str | None = None


def _locate(obj: Any, where: str) -> Any:
    """Wrap parsed YAML so every mapping / list carries its ``where``."""
    if isinstance(obj, Mapping):
        out = _LocDict((k, _locate(v, child_where(where, k))) for k, v in obj.items())
        out.where = where
        return out
    if isinstance(obj, list):
        out = _LocList(_locate(v, child_where(where, i)) for i, v in enumerate(obj))
        out.where = where
        return out
    return obj


@dataclasses.dataclass
class _RawFile:
    path: Path
    schema: str | None  # short schema name, e.g. "QuantizerCfgListConfig"
    imports: Any
    body: Any  # mapping or list, located


def _read_file(path: Path) -> _RawFile:
    disp = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{disp}: cannot read ({e.strerror or e})") from None
    schema = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        m = _SCHEMA_RE.match(line)
        if m:
            if schema is not None:
                raise RecipeError(f"{disp}: more than one '# modelopt-schema:' comment")
            full = m.group(1)
            short = full.rpartition(".")[2]
            if not full.startswith(_SCHEMA_PREFIXES) or short not in SCHEMAS:
                raise RecipeError(
                    f"{disp}: unsupported modelopt-schema {full!r}; supported: "
                    + ", ".join(_SCHEMA_PREFIXES[0] + s for s in SCHEMAS)
                )
            schema = short
    try:
        docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except RecipeError as e:
        raise RecipeError(f"{disp}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{disp}: invalid YAML: {e}") from None
    root = f"{disp}: "
    if not docs or docs[0] is None and len(docs) == 1:
        return _RawFile(path, schema, None, _locate({}, root))
    if len(docs) == 1:
        body = docs[0]
        if isinstance(body, Mapping):
            imports = body.get("imports")
            body = {k: v for k, v in body.items() if k != "imports"}
        elif isinstance(body, list):
            imports = None
        else:
            raise RecipeError(f"{disp}: must contain a YAML mapping or list, got {type(body).__name__}")
    elif len(docs) == 2:
        header, body = docs
        if not isinstance(header, Mapping):
            raise RecipeError(f"{disp}: the first YAML document must be a mapping (imports:)")
        imports = header.get("imports")
        if body is None:
            body = {}
        if isinstance(body, Mapping):
            body = {**{k: v for k, v in header.items() if k != "imports"}, **body}
        elif not isinstance(body, list):
            raise RecipeError(
                f"{disp}: the second YAML document must be a mapping or list, got {type(body).__name__}"
            )
    else:
        raise RecipeError(f"{disp}: expected 1 or 2 YAML documents, got {len(docs)}")
    return _RawFile(path, schema, imports, _locate(body, root))


# ------------------------------------------------------------------------------ path lookup
def _with_suffixes(p: str) -> list[str]:
    return [p] if p.endswith(_SUFFIXES) else [p + s for s in _SUFFIXES]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _find_import(ref: Any, roots: Sequence[Path], where: str) -> Path:
    if not isinstance(ref, str) or not ref.strip():
        raise RecipeError(f"{loc(where)}: an import path must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    p = Path(ref)
    if p.is_absolute():
        for cand in _with_suffixes(ref):
            cp = Path(cand)
            if cp.is_file():
                if not any(_inside(cp, r) for r in roots):
                    raise RecipeError(
                        f"{loc(where)}: {ref!r} is outside the recipe roots "
                        f"({', '.join(str(r) for r in roots)})"
                    )
                return cp.resolve()
        raise RecipeError(f"{loc(where)}: cannot find {ref!r} (.yaml / .yml)")
    for root in roots:
        for cand in _with_suffixes(ref):
            cp = root / cand
            if not _inside(cp, root):
                raise RecipeError(
                    f"{loc(where)}: {ref!r} escapes the recipe root {root}; imports must stay inside "
                    "the recipe roots"
                )
            if cp.is_file():
                return cp.resolve()
    raise RecipeError(
        f"{loc(where)}: cannot find {ref!r} (.yaml / .yml) under the recipe roots: "
        + ", ".join(str(r) for r in roots)
    )


# ------------------------------------------------------------------------------ import resolution
@dataclasses.dataclass
class _Imported:
    schema: str
    data: Any
    path: Path


class _Resolver:
    """Resolves ``imports`` / ``$import`` for one top-level load (caches snippets by path)."""

    def __init__(self, roots: Sequence[Path]):
        self.roots = [Path(r).resolve() for r in roots]
        self.cache: dict[Path, _Imported] = {}

    # -- files
    def load_file(self, path: Path, stack: tuple[Path, ...], schema_hint: str | None) -> tuple[str | None, Any]:
        raw = _read_file(path)
        disp = _display(path)
        import_map = self.load_imports(raw.imports, path, stack, f"{disp}: imports")
        schema = raw.schema or schema_hint
        body = self.resolve_value(raw.body, _schema_node(schema), import_map)
        return raw.schema, body

    def load_imports(self, imports: Any, path: Path | None, stack: tuple[Path, ...],
                     where: str) -> dict[str, _Imported]:
        if imports is None:
            return {}
        if not isinstance(imports, Mapping):
            raise RecipeError(f"{loc(where)}: must map names to config paths, got {type(imports).__name__}")
        out = {}
        for name, ref in imports.items():
            at = child_where(where, name)
            if not isinstance(name, str):
                raise RecipeError(
                    f"{at}: import name {name!r} must be a string (YAML reads unquoted "
                    "on/off/yes/no/true/false as booleans; quote the name or pick another)"
                )
            target = _find_import(ref, self.roots, at)
            if target in stack or target == path:
                chain = " -> ".join(_display(p) for p in (*stack, path, target) if p is not None)
                raise RecipeError(f"{at}: import cycle: {chain}")
            if target not in self.cache:
                schema, data = self.load_file(target, (*stack, *( (path,) if path else ())), None)
                if schema is None:
                    raise RecipeError(
                        f"{at}: {_display(target)} has no '# modelopt-schema: "
                        "modelopt.torch.quantization.config.<Type>' comment; every imported snippet "
                        "must declare its schema"
                    )
                _validate_snippet(schema, data, f"{_display(target)}: ")
                self.cache[target] = _Imported(schema, data, target)
            out[name] = self.cache[target]
        return out

    # -- values
    def resolve_value(self, obj: Any, node: str | None, imports: dict[str, _Imported]) -> Any:
        where = getattr(obj, "where", None) or "?"
        if isinstance(obj, Mapping):
            if _IMPORT in obj:
                refs = obj[_IMPORT]
                names = refs if isinstance(refs, list) else [refs]
                merged = _LocDict()
                for n in names:
                    imp = self._lookup(n, imports, child_where(where, _IMPORT))
                    if not isinstance(imp.data, Mapping):
                        raise RecipeError(
                            f"{child_where(where, _IMPORT)}: {n!r} ({_display(imp.path)}) is a "
                            f"{imp.schema} list; only mappings can be merged into a mapping"
                        )
                    merged.update(imp.data)
                for k, v in obj.items():
                    if k != _IMPORT:
                        merged[k] = v
                merged.where = where
                # Resolve any markers the inline keys bring along.
                return self.resolve_value(merged, node, imports)
            out = _LocDict(
                (k, self.resolve_value(v, _schema_child(node, k), imports)) for k, v in obj.items()
            )
            out.where = where
            return out
        if isinstance(obj, list):
            elem = _schema_elem(node)
            out = _LocList()
            out.where = where
            for i, item in enumerate(obj):
                if isinstance(item, Mapping) and _IMPORT in item and len(item) == 1:
                    refs = item[_IMPORT]
                    at = child_where(child_where(where, i), _IMPORT)
                    for n in refs if isinstance(refs, list) else [refs]:
                        imp = self._lookup(n, imports, at)
                        out.extend(_splice(imp, node, elem, at))
                else:
                    out.append(self.resolve_value(item, elem, imports))
            return out
        return obj

    @staticmethod
    def _lookup(name: Any, imports: dict[str, _Imported], where: str) -> _Imported:
        if not isinstance(name, str) or name not in imports:
            avail = ", ".join(imports) or "none are declared"
            raise RecipeError(f"{loc(where)}: unknown import {name!r}; declared imports: {avail}")
        return imports[name]


# Schema nodes used while resolving: which schema a mapping / list position has.
#   "recipe"     top-level recipe mapping
#   "quantize"   QuantizeConfig mapping
#   "entries"    list[QuantizerCfgEntry]
#   "entry"      QuantizerCfgEntry mapping
#   "attrs"      QuantizerAttributeConfig mapping, or a list of them (cfg)
def _schema_node(schema: str | None) -> str | None:
    return {
        "QuantizeConfig": "quantize",
        "QuantizerCfgListConfig": "entries",
        "QuantizerCfgEntry": "entry",
        "QuantizerAttributeConfig": "attrs",
        "recipe": "recipe",
    }.get(schema or "")


def _schema_child(node: str | None, key: Any) -> str | None:
    if node == "recipe" and key in ("quantize", "ptq_cfg"):
        return "quantize"
    if node == "recipe" and key == "quant_cfg":  # an mtq-style {algorithm, quant_cfg} file loaded as a recipe
        return "entries"
    if node == "quantize" and key == "quant_cfg":
        return "entries"
    if node == "entry" and key == "cfg":
        return "attrs"
    return None


def _schema_elem(node: str | None) -> str | None:
    if node == "entries":
        return "entry"
    if node == "attrs":
        return "attrs"
    return None


def _splice(imp: _Imported, node: str | None, elem: str | None, where: str) -> list:
    if node == "entries":
        if imp.schema == "QuantizerCfgListConfig":
            return list(imp.data)
        if imp.schema == "QuantizerCfgEntry":
            return [imp.data]
    elif node == "attrs" and imp.schema == "QuantizerAttributeConfig":
        return [imp.data]
    expected = {
        "entries": "QuantizerCfgListConfig (spliced) or QuantizerCfgEntry (appended)",
        "attrs": "QuantizerAttributeConfig",
    }.get(node or "", "a typed list (quant_cfg or a sequential cfg)")
    raise RecipeError(
        f"{loc(where)}: cannot use {_display(imp.path)} (schema {imp.schema}) here; expected {expected}"
    )


def _validate_snippet(schema: str, data: Any, where: str):
    """Check an imported snippet against its declared schema (as ModelOpt does on import)."""
    if schema == "QuantizerAttributeConfig":
        if not isinstance(data, Mapping):
            raise RecipeError(f"{loc(where)}: declared QuantizerAttributeConfig but is not a mapping")
        QuantizerConfig.from_dict(data, getattr(data, "where", where) or where)
    elif schema == "QuantizerCfgEntry":
        parse_entry(data, where)
    elif schema == "QuantizerCfgListConfig":
        if not isinstance(data, list):
            raise RecipeError(f"{loc(where)}: declared QuantizerCfgListConfig but is not a list")
        normalize_quant_cfg(data, where)
    elif schema == "QuantizeConfig":
        if not isinstance(data, Mapping):
            raise RecipeError(f"{loc(where)}: declared QuantizeConfig but is not a mapping")
        if "quant_cfg" in data:
            parse_quantize(data, where, source=None)


# ------------------------------------------------------------------------------ public API
def _default_roots(extra: Sequence[str | os.PathLike] | None, first: Path | None = None) -> list[Path]:
    roots: list[Path] = []
    if first is not None:
        roots.append(first)
    for r in extra or ():
        roots.append(Path(r))
    roots.append(builtin_root())
    seen, out = set(), []
    for r in roots:
        rr = r.resolve()
        if rr not in seen:
            seen.add(rr)
            out.append(rr)
    return out


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    """Where ``load_recipe`` finds ``name_or_path``: a built-in first, then the filesystem.

    Raises:
      UnsupportedError: a ModelOpt built-in recipe that jaxquant does not ship.
      RecipeError: nothing found (the message lists the built-in recipes).
    """
    s = os.fspath(name_or_path)
    builtin = builtin_root()
    candidates = [s] if s.endswith(_SUFFIXES) else [s, *(s + x for x in _SUFFIXES)]
    if not Path(s).is_absolute():
        for c in candidates:
            p = builtin / c
            if _inside(p, builtin) and (p.is_file() or (p.is_dir() and c == s)):
                return p
    for c in candidates:
        p = Path(c)
        if p.is_file() or (p.is_dir() and c == s):
            return p
    key = s[:-5] if s.endswith(".yaml") else s[:-4] if s.endswith(".yml") else s
    if key in _NOT_SHIPPED:
        raise UnsupportedError(
            f"ModelOpt recipe {key!r} needs {_NOT_SHIPPED[key]}, which jaxquant does not support "
            f"yet; built-in recipes: {', '.join(list_recipes())}"
        )
    raise RecipeError(
        f"no recipe {s!r}: not a built-in recipe and no such file or directory. Built-in recipes: "
        + ", ".join(list_recipes())
    )


def load_recipe(name_or_path: str | os.PathLike, *, roots: Sequence[str | os.PathLike] | None = None,
                check_supported: bool = True) -> Recipe:
    """Load a ModelOpt PTQ recipe.

    Args:
      name_or_path: a built-in name (``general/ptq/nvfp4_default-kv_fp8``, suffix optional), a
        YAML file, or a directory with ``metadata.yaml`` and ``quantize.yaml``.
      roots: extra folders that ``imports`` may reference (searched after the recipe's own folder
        and before the built-in folder).
      check_supported: raise ``UnsupportedError`` when an enabled rule needs a format (or the
        recipe an algorithm) jaxquant does not implement yet.

    Returns:
      The resolved ``Recipe`` (list form, imports spliced, legacy ``default`` hoisted).

    Raises:
      RecipeError: an invalid recipe; the message names the file and the key path.
      UnsupportedError: see ``check_supported``.
    """
    path = resolve_recipe_path(name_or_path)
    builtin = builtin_root()
    own = None if _inside(path, builtin) else (path if path.is_dir() else path.parent)
    resolver = _Resolver(_default_roots(roots, own))
    if path.is_dir():
        recipe = _load_recipe_dir(path, resolver)
    else:
        recipe = _load_recipe_file(path, resolver)
    if check_supported:
        recipe.check_supported()
    return recipe


def _load_recipe_file(path: Path, resolver: _Resolver) -> Recipe:
    """A recipe file: ``metadata`` + ``quantize`` (ModelOpt's form) or + the legacy ``ptq_cfg``; or, as
    ``recipe_from_dict`` takes it, an mtq-style ``{algorithm, quant_cfg}`` mapping (a ``QuantizeConfig``: no
    ``quantize:`` wrapper and no metadata, like ``mtq.FP8_DEFAULT_CFG`` written to YAML)."""
    disp = _display(path)
    schema, body = resolver.load_file(path.resolve(), (), "recipe")
    if not isinstance(body, Mapping):
        raise RecipeError(f"{disp}: a recipe must be a mapping with metadata and quantize (or an mtq-style "
                          "mapping with quant_cfg and algorithm)")
    if schema == "QuantizeConfig" or ("quant_cfg" in body and not any(k in body for k in _WRAPPER_KEYS)):
        return parse_quantize(body, f"{disp}: ", source=str(path))
    return parse_recipe_mapping(body, str(path), f"{disp}: ")


_WRAPPER_KEYS = ("metadata", "quantize", "ptq_cfg")


def _load_recipe_dir(path: Path, resolver: _Resolver) -> Recipe:
    def find(stem: str) -> Path:
        for s in _SUFFIXES:
            if (path / (stem + s)).is_file():
                return path / (stem + s)
        raise RecipeError(f"{path}: a directory recipe needs {stem}.yaml (or {stem}.yml)")

    mfile, qfile = find("metadata"), find("quantize")
    _, meta = resolver.load_file(mfile.resolve(), (), None)
    metadata = parse_metadata(meta, f"{_display(mfile)}: ")
    _, q = resolver.load_file(qfile.resolve(), (), "QuantizeConfig")
    return parse_quantize(q, f"{_display(qfile)}: ", source=str(path), metadata=metadata)


def load_config(name_or_path: str | os.PathLike, *, roots: Sequence[str | os.PathLike] | None = None) -> Any:
    """Load any config snippet (a preset, a unit, a numerics file) with imports resolved.

    Like ModelOpt's ``load_config``, but looks in the built-in folder first. Returns plain
    (located) mappings / lists; use ``recipe_from_dict`` or ``QuantizerConfig.from_dict`` on them.
    """
    path = resolve_recipe_path(name_or_path)
    builtin = builtin_root()
    own = None if _inside(path, builtin) else path.parent
    resolver = _Resolver(_default_roots(roots, own))
    schema, body = resolver.load_file(path.resolve(), (), None)
    if schema is not None:
        _validate_snippet(schema, body, f"{_display(path)}: ")
    return body


def resolve_imports_in_data(d: Mapping, source: str,
                            roots: Sequence[str | os.PathLike] | None = None) -> Any:
    """Resolve ``imports`` / ``$import`` in an in-memory recipe mapping (built-in roots)."""
    resolver = _Resolver(_default_roots(roots))
    located = _locate(dict(d), f"{source}: ")
    imports = located.pop("imports", None)
    import_map = resolver.load_imports(imports, None, (), f"{source}: imports")
    node = "recipe" if ("metadata" in located or "quantize" in located or "ptq_cfg" in located) \
        else "quantize"
    return resolver.resolve_value(located, node, import_map)
