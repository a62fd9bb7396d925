"""Resolve a recipe's ``quant_cfg`` rules to one config per quantizer, as ModelOpt does.

ModelOpt's ``set_quantizer_by_cfg`` (spec modelopt.md §1.3) walks the rules in order; a rule
matches a quantizer when its ``quantizer_name`` glob matches the quantizer's full name
(``fnmatch``; fused-expert names ``..._weight_quantizers.N`` also match in the normalized form
``..._weight_quantizer``; a site's ``aliases``, e.g. ModelOpt's fused name of a per-expert quantizer, match too)
and, with ``parent_class``, when the owning module is of that class.
Then:

* a rule with ``cfg`` *replaces* all attributes (unspecified ones go back to the defaults) and
  sets the enable flag (``enable``, default true);
* a rule without ``cfg`` only toggles the enable flag and keeps the attributes;
* later rules win.

``resolve`` does exactly that on plain names (``QuantizerSite``), so it works for any model:
our NNX models (``apply_recipe``), any JAX pytree of parameters (``sites_from_pytree``,
``resolve_pytree``), or ModelOpt's own torch module names. Matching is case-sensitive
(``fnmatch.fnmatchcase``), which is what ModelOpt's ``fnmatch.fnmatch`` does on Linux.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.quantizer.config import SUPPORTED_FORMATS, QuantizerConfig
from jaxquant.quantizer.sequential import as_quantizer_config
from jaxquant.recipe.recipe import QuantCfgEntry, Recipe, loc, recipe_from_dict

Config = QuantizerConfig | tuple[QuantizerConfig, ...]

_FUSED_RE = re.compile(r"(weight_quantizers?|input_quantizers?)\.\d+(?=$|\.)")


def normalize_quantizer_name(name: str) -> str:
    """ModelOpt's fused-experts normalization: ``x.gate_up_proj_weight_quantizers.3`` ->
    ``x.gate_up_proj_weight_quantizer`` (so ``*weight_quantizer`` rules match per-expert
    quantizers kept in a list)."""
    return _FUSED_RE.sub(lambda m: m.group(1).removesuffix("s"), name)


#: An expert quantizer as jaxquant (and the hub checkpoints) name it, per expert and projection.
_EXPERT_RE = re.compile(r"^(?P<pre>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\."
                        r"(?P<role>weight|input)_quantizer$")
#: The fused projection ModelOpt's transformers-5 experts module holds for each per-expert projection.
_FUSED_PROJ = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
               "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}


def fused_expert_name(name: str) -> str | None:
    """The name nvidia-modelopt 0.47 on transformers 5 gives the quantizer jaxquant names ``name``, where that differs.

    transformers 5 stores a Llama-style MoE block's experts fused (``mlp.experts``, gate and up in one
    ``gate_up_proj``), and ModelOpt quantizes them as ``mlp.experts.gate_up_proj_weight_quantizers.{e}`` (one per
    expert) and one shared ``mlp.experts.gate_up_proj_input_quantizer`` (``down_proj`` likewise; Mixtral's
    ``block_sparse_moe`` w1 / w3 / w2 too). jaxquant names them per expert as the checkpoints do
    (``mlp.experts.{e}.gate_proj.weight_quantizer``); a rule matches either name (``resolve``), so a user's
    ``*gate_up_proj*`` selects the experts' gate and up projections here as in ModelOpt. None for other names."""
    m = _EXPERT_RE.match(name)
    if m is None or m["proj"] not in _FUSED_PROJ:
        return None
    fused = _FUSED_PROJ[m["proj"]]
    if m["role"] == "weight":
        return f"{m['pre']}.mlp.experts.{fused}_weight_quantizers.{m['e']}"
    return f"{m['pre']}.mlp.experts.{fused}_input_quantizer"


@dataclasses.dataclass(frozen=True)
class QuantizerSite:
    """One quantizer to resolve.

    Attributes:
      name: the full dotted name, ModelOpt-style (``model.layers.3.self_attn.q_proj.weight_quantizer``).
      parent_class: the owning module's class name as ModelOpt registers it (``"nn.Linear"``,
        ``"nn.Embedding"``), or several names (a class and its bases), or None.
      initial: the attributes before any rule applies; None means ModelOpt's default for the
        site (INT8 per-tensor; INT8 per-channel for a linear's weight; output quantizers off).
      aliases: other names a rule may match the quantizer by (``fused_expert_name``).
    """

    name: str
    parent_class: str | tuple[str, ...] | None = None
    initial: QuantizerConfig | None = None
    aliases: tuple[str, ...] = ()

    @property
    def classes(self) -> tuple[str, ...]:
        if self.parent_class is None:
            return ()
        if isinstance(self.parent_class, str):
            return (self.parent_class,)
        return tuple(self.parent_class)


def default_initial(site: QuantizerSite) -> QuantizerConfig:
    """ModelOpt's attributes of a freshly inserted quantizer (what an enable-only rule turns on
    when no cfg rule touched the quantizer)."""
    leaf = site.name.rpartition(".")[2]
    if leaf.startswith("output_quantizer"):
        return QuantizerConfig(enable=False)
    if "weight_quantizer" in leaf and any(
        c == "nn.Linear" or c.startswith("nn.Conv") for c in site.classes
    ):
        return QuantizerConfig(num_bits=8, axis=0)
    return QuantizerConfig(num_bits=8, axis=None)


@dataclasses.dataclass(frozen=True)
class RuleRef:
    """A rule of the recipe, by position."""

    index: int
    entry: QuantCfgEntry

    def __str__(self) -> str:
        s = f"#{self.index} {self.entry.describe()}"
        if self.entry.where:
            s += f"  [{loc(self.entry.where)}]"
        return s


def format_name(cfg: Config | None) -> str | None:
    """The format of a resolved config: ``"fp8"``, ``"nvfp4"``, ... or None when disabled."""
    if cfg is None:
        return None
    if isinstance(cfg, tuple):
        return "+".join(c.format for c in cfg)
    return cfg.format


@dataclasses.dataclass
class Resolution:
    """The result of resolving a recipe on a model's quantizers.

    Attributes:
      configs: every quantizer name (per instance for stacked experts) -> its final config, or
        None when disabled.
      sites: the quantizers, in model order.
      rules: the recipe's rules.
      last_rule: quantizer name -> index of the last rule that matched it (None: no rule).
      match_counts: per rule, how many quantizers it matched.
      quantizers: per model quantizer (a stacked MoE quantizer once, under its own path) -> config.
        Equal to ``configs`` when nothing is stacked.
      instances: stacked quantizer path -> its per-instance names.
      names: model quantizer path -> the ModelOpt name(s) it was resolved under (``apply_recipe``).
      recipe: the recipe, when one was given.
    """

    configs: dict[str, Config | None]
    sites: tuple[QuantizerSite, ...]
    rules: tuple[QuantCfgEntry, ...]
    last_rule: dict[str, int | None]
    match_counts: tuple[int, ...]
    quantizers: dict[str, Config | None] = dataclasses.field(default_factory=dict)
    #: disabled quantizers whose config still rotates their input (ModelOpt rotates a disabled quantizer's input:
    #: ``kv_nvfp4_rotate``'s ``q_bmm_quantizer``) -> that config; ``configs`` has None for them
    disabled_rotating: dict[str, QuantizerConfig] = dataclasses.field(default_factory=dict)
    instances: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    recipe: Recipe | None = None

    # ------------------------------------------------------------------ queries
    @property
    def unmatched_rules(self) -> tuple[RuleRef, ...]:
        """Rules that matched no quantizer (often fine: exclusions for other architectures)."""
        return tuple(RuleRef(i, e) for i, (e, n) in enumerate(zip(self.rules, self.match_counts))
                     if n == 0)

    @property
    def unmatched_enabling_rules(self) -> tuple[RuleRef, ...]:
        """Unmatched rules that would have enabled or configured something: usually a recipe
        written for another model (or a typo in a pattern)."""
        return tuple(r for r in self.unmatched_rules if r.entry.effective_enable)

    @property
    def enabled(self) -> dict[str, Config]:
        """The enabled quantizers and their configs."""
        return {k: v for k, v in self.configs.items() if v is not None}

    @property
    def formats(self) -> dict[str, str | None]:
        """Quantizer name -> format name (None when disabled)."""
        return {k: format_name(v) for k, v in self.configs.items()}

    def counts(self) -> dict[str, int]:
        """Number of quantizers per format, plus ``"disabled"``."""
        out: dict[str, int] = {}
        for v in self.configs.values():
            k = format_name(v) or "disabled"
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (kv[0] == "disabled", -kv[1], kv[0])))

    def unsupported(self) -> list[tuple[str, str]]:
        """(quantizer name, reason) for enabled quantizers jaxquant cannot run yet."""
        out = []
        for name, cfg in self.configs.items():
            if cfg is None:
                continue
            reason = as_quantizer_config(cfg).unsupported_reason
            if reason is not None:
                out.append((name, reason))
        return out

    def check_supported(self):
        """Raise ``UnsupportedError`` naming the quantizers whose format jaxquant lacks."""
        bad = self.unsupported()
        if bad:
            shown = "\n  - ".join(f"{n}: {r}" for n, r in bad[:8])
            more = f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else ""
            raise UnsupportedError(
                f"{len(bad)} quantizer(s) resolve to something jaxquant does not support yet:\n  - "
                f"{shown}{more}\nSupported formats: {', '.join(SUPPORTED_FORMATS)}."
            )
        return self

    def check_unmatched(self, strict: bool | str = True):
        """Raise ``RecipeError`` for unmatched rules.

        Args:
          strict: True: rules that enable or configure quantizers but matched none; ``"all"``:
            every unmatched rule, exclusions included; False: never raise.
        """
        if not strict:
            return self
        bad = self.unmatched_rules if strict == "all" else self.unmatched_enabling_rules
        if bad:
            name = self.recipe.name if self.recipe is not None else "the recipe"
            raise RecipeError(
                f"{len(bad)} rule(s) of {name} matched no quantizer of this model:\n  - "
                + "\n  - ".join(str(r) for r in bad)
            )
        return self

    # ------------------------------------------------------------------ report
    def report(self, *, collapse: bool = True, show_disabled: bool = True) -> str:
        """A readable table: quantizer -> format (and the deciding rule), counts per format,
        and the rules that matched nothing.

        Args:
          collapse: fold numbered names (``layers.0`` ... ``layers.31``) that resolve alike into
            one row, e.g. ``model.layers.{0-31}.mlp.up_proj.weight_quantizer``.
          show_disabled: include disabled quantizers in the table.
        """
        rows: list[tuple[str, str, str]] = []
        if collapse:
            groups: dict[tuple, list[tuple[int, ...]]] = {}
            for name, cfg in self.configs.items():
                if cfg is None and not show_disabled:
                    continue
                parts = name.split(".")
                nums = tuple(int(p) for p in parts if p.isdigit())
                tmpl = tuple("{}" if p.isdigit() else p for p in parts)
                key = (tmpl, format_name(cfg) or "-", self.last_rule.get(name))
                groups.setdefault(key, []).append(nums)
            for (tmpl, fmt, rule), nums in groups.items():
                rows.append((_render_template(tmpl, nums), fmt, self._rule_label(rule)))
        else:
            for name, cfg in self.configs.items():
                if cfg is None and not show_disabled:
                    continue
                rows.append((name, format_name(cfg) or "-", self._rule_label(self.last_rule.get(name))))
        title = "quantizer resolution"
        if self.recipe is not None:
            title += f" for {self.recipe.name} (algorithm {self.recipe.method})"
        lines = [f"{title}: {len(self.configs)} quantizers, {len(self.rules)} rules"]
        w0 = max([len("quantizer"), *(len(r[0]) for r in rows)])
        w1 = max([len("format"), *(len(r[1]) for r in rows)])
        lines.append(f"{'quantizer':<{w0}}  {'format':<{w1}}  rule")
        lines.append(f"{'-' * w0}  {'-' * w1}  ----")
        for a, b, c in rows:
            lines.append(f"{a:<{w0}}  {b:<{w1}}  {c}")
        lines.append("")
        lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in self.counts().items()))
        if self.instances:
            lines.append(f"stacked quantizers: {len(self.instances)} (each listed per instance)")
        un_en = self.unmatched_enabling_rules
        un_ex = [r for r in self.unmatched_rules if not r.entry.effective_enable]
        if un_en:
            lines.append(f"WARNING: rules that enable or configure quantizers but matched nothing "
                         f"({len(un_en)}):")
            lines.extend(f"  {r}" for r in un_en)
        if un_ex:
            pats = ", ".join(
                r.entry.quantizer_name + (f" [{r.entry.parent_class}]" if r.entry.parent_class else "")
                for r in un_ex
            )
            lines.append(f"exclusion rules that matched nothing ({len(un_ex)}; modules this model "
                         f"does not have): {pats}")
        if not un_en and not un_ex:
            lines.append("every rule matched at least one quantizer")
        return "\n".join(lines)

    def _rule_label(self, i: int | None) -> str:
        if i is None:
            return "(no rule)"
        e = self.rules[i]
        return f"#{i} {e.quantizer_name!r}" + (f" [{e.parent_class}]" if e.parent_class else "")

    def __str__(self) -> str:
        return self.report()




def _ranges(values: Iterable[int]) -> str:
    vs = sorted(set(values))
    out, start, prev = [], None, None
    for v in vs:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(out)


def _render_template(tmpl: tuple[str, ...], nums: list[tuple[int, ...]]) -> str:
    if len(nums) == 1:
        it = iter(nums[0])
        return ".".join(str(next(it)) if p == "{}" else p for p in tmpl)
    cols = list(zip(*nums)) if nums and nums[0] else []
    parts, c = [], 0
    for p in tmpl:
        if p == "{}":
            vals = set(cols[c])
            parts.append(str(next(iter(vals))) if len(vals) == 1 else "{" + _ranges(vals) + "}")
            c += 1
        else:
            parts.append(p)
    s = ".".join(parts)
    total = 1
    for col in cols:
        total *= len(set(col))
    if total != len(nums):
        s += f"  ({len(nums)} of these)"
    return s


# ---------------------------------------------------------------------------------- resolve
def _as_rules(quant_cfg: Any) -> tuple[tuple[QuantCfgEntry, ...], Recipe | None]:
    if isinstance(quant_cfg, Recipe):
        return quant_cfg.quant_cfg, quant_cfg
    if isinstance(quant_cfg, str):
        from jaxquant.recipe.loader import load_recipe

        r = load_recipe(quant_cfg, check_supported=False)
        return r.quant_cfg, r
    if isinstance(quant_cfg, Sequence) and all(isinstance(e, QuantCfgEntry) for e in quant_cfg):
        return tuple(quant_cfg), None
    r = recipe_from_dict(quant_cfg, check_supported=False)
    return r.quant_cfg, r


def _as_site(s: Any) -> QuantizerSite:
    if isinstance(s, QuantizerSite):
        return s
    if isinstance(s, str):
        return QuantizerSite(s)
    if isinstance(s, (tuple, list)) and 1 <= len(s) <= 2:
        return QuantizerSite(*s)
    raise TypeError(f"not a quantizer site: {s!r} (use QuantizerSite(name, parent_class))")


def _toggle(cfg: Config, enable: bool) -> Config:
    if isinstance(cfg, tuple):
        return tuple(c if c.enable == enable else c.replace(enable=enable) for c in cfg)
    return cfg if cfg.enable == enable else cfg.replace(enable=enable)


def _final(cfg: Config) -> Config | None:
    if isinstance(cfg, tuple):
        return cfg if any(c.enable for c in cfg) else None
    return cfg if cfg.enable else None


def resolve(quant_cfg: Any, sites: Iterable[QuantizerSite | str | tuple]) -> Resolution:
    """Resolve every quantizer's final config with ModelOpt's ``set_quantizer_by_cfg`` semantics.

    Args:
      quant_cfg: a ``Recipe``, a recipe name, a sequence of ``QuantCfgEntry``, or any ModelOpt
        config accepted by ``recipe_from_dict`` (list form, legacy dict form, ``{"quant_cfg": ...}``).
      sites: the quantizers (``QuantizerSite``, a name, or ``(name, parent_class)``).

    Returns:
      A ``Resolution``; ``configs[name]`` is None for a disabled quantizer.

    Example:
      >>> r = resolve("general/ptq/fp8_default-kv_fp8",
      ...             [QuantizerSite("model.layers.0.self_attn.q_proj.weight_quantizer", "nn.Linear"),
      ...              QuantizerSite("lm_head.weight_quantizer", "nn.Linear")])
      >>> r.formats
      {'model.layers.0.self_attn.q_proj.weight_quantizer': 'fp8', 'lm_head.weight_quantizer': None}
    """
    rules, recipe = _as_rules(quant_cfg)
    sites = tuple(_as_site(s) for s in sites)
    seen: set[str] = set()
    for s in sites:
        if s.name in seen:
            raise ValueError(f"duplicate quantizer name {s.name!r}")
        seen.add(s.name)
    names = [s.name for s in sites]
    # every form a rule may match: the name, its fused-experts normalization, and the same for each alias
    forms = [tuple(dict.fromkeys(f for a in (s.name, *s.aliases) for f in (a, normalize_quantizer_name(a))))
             for s in sites]
    classes = [s.classes for s in sites]
    state: list[Config] = [s.initial if s.initial is not None else default_initial(s) for s in sites]
    last: list[int | None] = [None] * len(sites)
    counts = []
    for i, e in enumerate(rules):
        match = re.compile(fnmatch.translate(e.quantizer_name)).match
        n_matched = 0
        for j in range(len(names)):
            if not any(match(f) for f in forms[j]):
                continue
            if e.parent_class and e.parent_class not in classes[j]:
                continue
            n_matched += 1
            state[j] = e.cfg if e.cfg is not None else _toggle(state[j], e.effective_enable)
            last[j] = i
        counts.append(n_matched)
    configs = {n: _final(c) for n, c in zip(names, state)}
    rotating = {n: c for n, c in zip(names, state)
                if configs[n] is None and not isinstance(c, tuple) and c.rotation is not None}
    return Resolution(
        configs=configs,
        sites=sites,
        rules=tuple(rules),
        last_rule=dict(zip(names, last)),
        match_counts=tuple(counts),
        quantizers=dict(configs),
        names={n: (n,) for n in names},
        recipe=recipe,
        disabled_rotating=rotating,
    )


# ---------------------------------------------------------------------------------- pytrees
_EMBED_RE = re.compile(r"(^|_)(embed|embedding|embeddings|wte|wpe)(_|$)|embed_tokens|word_embeddings")


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def sites_from_pytree(params: Any, *, input_quantizers: bool = True) -> list[QuantizerSite]:
    """Quantizer sites for a pytree of parameters, by path.

    Works on plain nested dicts, Linen variables (``{"params": {...}}``) and NNX states
    (``nnx.state(model)``). A ``kernel`` or ``weight`` leaf with ``ndim >= 2`` becomes a linear:
    ``<module path>.weight_quantizer`` and ``<module path>.input_quantizer`` with parent class
    ``nn.Linear``. An ``embedding`` leaf, or a ``weight`` under a module named like an embedding
    (``embed_tokens``, ``wte``, ``word_embeddings``), becomes ``<path>.weight_quantizer`` with
    parent class ``nn.Embedding`` (ModelOpt hard-disables embedding inputs). Paths are joined with
    dots, list indices as plain numbers; a leading ``params`` collection and trailing ``value``
    are dropped; existing quantizer state (``*_quantizer`` paths) is skipped. Attention KV
    quantizers are not parameters, so they do not appear.

    Args:
      params: the pytree.
      input_quantizers: also emit ``input_quantizer`` sites for linears.
    """
    import jax

    def is_leaf(x):
        return hasattr(x, "shape") and not isinstance(x, Mapping)

    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
    sites: list[QuantizerSite] = []
    seen: set[str] = set()
    for path, leaf in flat:
        comps = [_key_str(k) for k in path]
        while comps and comps[-1] in ("value", "raw_value"):
            comps.pop()
        if comps and comps[0] == "params":
            comps = comps[1:]
        if len(comps) < 2 or any(c.endswith("_quantizer") or c.endswith("_quantizers") for c in comps):
            continue
        shape = getattr(getattr(leaf, "value", leaf), "shape", None)
        if shape is None:
            continue
        leaf_name, module = comps[-1], comps[:-1]
        mpath = ".".join(module)
        if leaf_name == "embedding" or (
            leaf_name == "weight" and len(shape) >= 2 and _EMBED_RE.search(module[-1])
        ):
            new = [QuantizerSite(f"{mpath}.weight_quantizer", "nn.Embedding")]
        elif leaf_name in ("kernel", "weight") and len(shape) >= 2:
            new = [QuantizerSite(f"{mpath}.weight_quantizer", "nn.Linear")]
            if input_quantizers:
                new.append(QuantizerSite(f"{mpath}.input_quantizer", "nn.Linear"))
        else:
            continue
        for s in new:
            if s.name not in seen:
                seen.add(s.name)
                sites.append(s)
    return sites


def resolve_pytree(recipe: Any, params: Any, *, input_quantizers: bool = True) -> Resolution:
    """``resolve(recipe, sites_from_pytree(params))``: which format each parameter's linear gets.

    Args:
      recipe: a ``Recipe``, a recipe name or path, or a ModelOpt-style config.
      params: any pytree of parameters (plain dict, Linen variables, NNX state).
    """
    return resolve(recipe, sites_from_pytree(params, input_quantizers=input_quantizers))


class UnmatchedRuleWarning(UserWarning):
    """A recipe rule that enables quantizers matched none (filter it with ``warnings``)."""


def warn_unmatched(res: Resolution, stacklevel: int = 3):
    """Warn (one line) about rules that enable or configure quantizers but matched none, and
    loudly when the recipe enables nothing at all on this model."""
    name = res.recipe.name if res.recipe is not None else "the recipe"
    if not res.enabled:
        warnings.warn(f"{name} enables no quantizer of this model", UnmatchedRuleWarning,
                      stacklevel=stacklevel)
        return
    un = res.unmatched_enabling_rules
    if un:
        pats = ", ".join(dict.fromkeys(r.entry.quantizer_name for r in un))
        warnings.warn(
            f"{len(un)} rule(s) of {name} that enable quantizers match nothing in this model "
            f"(fine for patterns aimed at other architectures): {pats}",
            UnmatchedRuleWarning,
            stacklevel=stacklevel,
        )
