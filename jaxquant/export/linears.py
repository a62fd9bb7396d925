"""What the exporter writes per quantizer site: linears (plain and per expert), KV scales, embeddings.

Export reads the model through the same site walker as calibration, finalize and QAT
(``calibration.sites.quantizer_sites``), not through model classes: every module that owns a
``weight_quantizer`` site is a linear, whatever its class. jaxquant's own ``Linear``, the stacked
``MoeExperts`` (one linear per expert, named by the site's per-instance ModelOpt names) and a user's
``nnx.Linear`` prepared with ``attach_quantizers`` / ``prepare_qat`` (its ``kernel [in, out]`` is
exported as torch's ``weight [out, in]``) all export the same way. The owning module's protocol
(``weight_param_name``, ``weight_of``, ``quantizer_names``) is all the exporter needs.

Fused siblings are found with calibration's own groups (``finalize.fused_sibling_groups``, ModelOpt's
``SHARED_PATTERNS``), so one definition of "fused" serves calibration and export.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxquant import formats
from jaxquant.calibration.finalize import fused_sibling_groups
from jaxquant.calibration.sites import Site, quantizer_sites
from jaxquant.errors import UnsupportedError
from jaxquant.recipe.apply import module_table
from jaxquant.export import quant_config as qc


def variable_value(v) -> Any:
    """The array held by an NNX variable (or the array itself)."""
    if v is None:
        return None
    if hasattr(v, "get_value"):
        return v.get_value()
    return getattr(v, "value", v)


def config_of(q):
    """A quantizer's config, or None when it is absent or disabled."""
    return q.config if (q is not None and q.enabled) else None


def name_map_of(model, name_map=None):
    """The ``NameMap`` export uses for ``model``: the given one, the model family's, or identity (a user's model)."""
    from jaxquant.converters.names import NameMap

    if name_map is not None:
        return name_map
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "architecture", None):
        return NameMap.for_config(config)
    return NameMap()


def natural_key(name: str):
    """Sort key: digit runs compare as numbers (``layers.10`` after ``layers.9``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# transformers' module registration order (what ModelOpt's named_modules() walks); the NNX graph
# is walked alphabetically. The order only decides the group numbering of MIXED_PRECISION
# config_groups, which we keep identical to ModelOpt's ("model" first: the text model before ``lm_head``).
_HF_RANK = {n: i for i, n in enumerate((
    "model", "embed_tokens", "layers", "input_layernorm", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
    "q_norm", "k_norm", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp", "block_sparse_moe",
    "gate", "router", "experts", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "shared_expert",
    "shared_expert_gate", "post_feedforward_layernorm", "norm", "lm_head"))}


def hf_order_key(name: str):
    """Sort key: transformers' module order (``q_proj`` before ``k_proj``), layers by number."""
    return [(0, int(t)) if t.isdigit() else (1, _HF_RANK.get(t, len(_HF_RANK)), t) for t in name.split(".")]


@dataclasses.dataclass
class ExportLinear:
    """One exported linear: a module with a weight quantizer, or one expert of a stacked one."""

    hf: str  # ModelOpt module name, e.g. model.layers.0.self_attn.q_proj
    weight: Any  # lazy [out, in] view (``SiteWeight`` / ``ExpertWeight``)
    wq: Any  # weight TensorQuantizer
    iq: Any  # input TensorQuantizer (or None)
    fmt: str | None  # ModelOpt format of (weight, input), None when unquantized
    param_path: str  # NNX path of the parameter this linear's weight entries replace
    w_amax: Any = None  # per-tensor (or per-channel / per-block) weight amax, float32
    w_block_amax: Any = None  # static NVFP4 per-block amax
    in_amax: Any = None  # input amax (None: no input_scale)
    expert: tuple[str, int, str] | None = None  # (experts module name, e, ModelOpt leaf name) for MoE
    pqs: Any = None  # the input's pre_quant_scale to write (float32 [in]; export/prequant.py), or None


class SiteWeight:
    """Lazy ``[out, in]`` weight of a plain site: nothing is computed (no transpose copy) until export asks."""

    def __init__(self, site: Site):
        self.site = site
        param = variable_value(getattr(site.parent, site.weight_param))
        fn = getattr(site.parent, "quantizer_tensor_shape", None)
        shape = fn(site.attr) if callable(fn) else None
        self.shape = tuple(shape) if shape is not None else tuple(param.shape)
        self.dtype = np.dtype(param.dtype)

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.on_device())
        return a if dtype is None else a.astype(dtype)

    def on_device(self):
        """The weight as a jax array where it lives, times the weight quantizer's pre_quant_scale if it has one
        (a smoothed weight, as ModelOpt folds it)."""
        return self.site.quantizer.scaled(jnp.asarray(self.site.weight()))


class ExpertWeight:
    """Lazy view of expert ``e`` of a stacked ``[E, out, in]`` parameter."""

    def __init__(self, stacked, e):
        self.stacked, self.e = stacked, e

    @property
    def shape(self):
        return tuple(self.stacked.shape[1:])

    @property
    def dtype(self):
        return np.dtype(self.stacked.dtype)

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.stacked[self.e])
        return a if dtype is None else a.astype(dtype)

    def on_device(self):
        """Expert ``e``'s weight, sliced where the stacked parameter lives (no host copy)."""
        from jaxquant.mesh import settle

        return settle(self.stacked[self.e])  # settle: one computation at a time over a CPU mesh


class Walked(NamedTuple):
    """The model as export sees it (one walk)."""

    sites: list[Site]
    linears: list[ExportLinear]  # per module, per expert, in model order
    kv: dict[str, dict[str, Any]]  # attention module name -> {"k_bmm_quantizer": q, "v_bmm_quantizer": q, ...}
    embeddings: list[str]  # modules ModelOpt lists as unquantized nn.Embedding (not Gemma's scaled ones)


def _layer_format(hf: str, wcfg, icfg) -> str | None:
    try:
        return qc.modelopt_format(wcfg, icfg)
    except UnsupportedError as e:
        raise UnsupportedError(f"{hf}: {e}") from None


def _f32(a) -> np.ndarray:
    return np.asarray(variable_value(a)).astype(np.float32)


def _amaxes(fmt: str, wq, iq, icfg, n: int | None, activations: bool = True):
    """(weight amax, block amax, input amax) of a site, each with a leading ``[n]`` for ``n`` experts
    (``activations`` False: the input amax is a placeholder of ones, for an export planned before calibration)."""
    qf = formats.get(fmt)
    lead = () if n is None else (n,)
    if qf.static_blocks:
        w_amax, blk = _f32(wq.global_amax).reshape(lead), _f32(wq.amax)
    else:
        blk, w_amax = None, _f32(wq.amax)
        if not qf.blocked_amax:
            w_amax = w_amax.reshape(*lead, -1) if qf.per_channel else w_amax.reshape(lead)
    in_amax = None
    if icfg is not None and qf.static_input_scale and not icfg.is_dynamic:
        fixed = icfg.fixed_amax
        if fixed is None and not activations:
            fixed = 1.0
        in_amax = (np.full(lead, fixed, np.float32) if fixed is not None else _f32(iq.amax).reshape(lead))
    return w_amax, blk, in_amax


def _sibling(site: Site, by_attr: dict, role: str):
    """The quantizer beside a weight site: ``input_quantizer`` next to ``weight_quantizer``."""
    prefix = site.attr[: -len("weight_quantizer")]
    other = by_attr.get((id(site.parent), prefix + role))
    return other.quantizer if other is not None else None


def walk(model, name_map=None, *, need_amax: bool, activations: bool = True, include=None) -> Walked:
    """Walk ``model``'s quantizer sites once and collect what export writes (module doc).

    ``need_amax``: read the calibrated amax (False for a configured, not yet calibrated model);
    ``activations`` False: read the weights' amax only (input amax placeholders of ones);
    ``include(HF module name)``: only the sites it accepts (one stage of a streamed export)."""
    nm = name_map_of(model, name_map)
    sites = quantizer_sites(model, nm.hf_name)
    if include is not None:
        sites = [s for s in sites if include(s.module_names[0])]
    by_attr = {(id(s.parent), s.attr): s for s in sites}
    linears: list[ExportLinear] = []
    kv: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for s in sites:
        if s.role == "bmm":
            kv[s.module_names[0]][s.attr] = s.quantizer
        if s.role != "weight":
            continue
        iq = _sibling(s, by_attr, "input_quantizer")
        wcfg, icfg = config_of(s.quantizer), config_of(iq)
        if not s.stacked:
            hf = s.module_names[0]
            fmt = _layer_format(hf, wcfg, icfg)
            item = ExportLinear(hf, SiteWeight(s), s.quantizer, iq, fmt, s.weight_path)
            if need_amax and fmt is not None:
                item.w_amax, item.w_block_amax, item.in_amax = _amaxes(fmt, s.quantizer, iq, icfg, None, activations)
            linears.append(item)
            continue
        stacked = variable_value(getattr(s.parent, s.weight_param))
        E = s.quantizer.instances
        module, _, leaf = s.module_names[0].rpartition(".")
        module = module.rpartition(".")[0]  # ...experts.0.gate_proj -> ...experts
        fmt = _layer_format(f"{module}.*.{leaf}", wcfg, icfg)
        w_amax = blk = in_amax = None
        if need_amax and fmt is not None:
            w_amax, blk, in_amax = _amaxes(fmt, s.quantizer, iq, icfg, E, activations)
        for e, hf in enumerate(s.module_names):
            linears.append(ExportLinear(
                hf, ExpertWeight(stacked, e), s.quantizer, iq, fmt, s.weight_path,
                w_amax=None if w_amax is None else w_amax[e], w_block_amax=None if blk is None else blk[e],
                in_amax=in_amax,  # the full [E] vector, reduced by unify()
                expert=(module, e, leaf)))
    linears.sort(key=lambda it: hf_order_key(it.hf))
    kv = {k: v for k, v in kv.items() if "k_bmm_quantizer" in v and "v_bmm_quantizer" in v}
    embeddings = [nm.hf_name(".".join(map(str, p))) for p, m in module_table(model).items()
                  if getattr(m, "modelopt_class", None) == "nn.Embedding" and getattr(m, "scale", None) is None]
    if include is not None:
        embeddings = [n for n in embeddings if include(n)]
    return Walked(sites, linears, kv, embeddings)


def _share_max(members: list[ExportLinear], field: str) -> None:
    vals = [np.max(getattr(x, field)) for x in members if getattr(x, field) is not None]
    if vals:
        m = np.float32(np.max(vals))
        for x in members:
            if getattr(x, field) is not None:
                setattr(x, field, m)


def unify(items: list[ExportLinear]) -> None:
    """Serving-engine fusion, in place: NVFP4 fused siblings (q/k/v, gate/up, w1/w3) share one
    weight amax and one input amax; MoE experts share one input amax per fused projection group of
    a layer (all formats), and an expert's fused gate/up weights one per-tensor weight amax."""
    plain = {it.hf: it for it in items if it.expert is None and it.fmt is not None}
    for group in fused_sibling_groups(list(plain)):
        members = [plain[n] for n in group]
        qf = formats.get(members[0].fmt)
        if not qf.shares_fused_scales:
            continue
        if not qf.per_channel:  # ModelOpt unifies a one-element weight amax only
            _share_max(members, "w_amax")
        _share_max(members, "in_amax")
    moe: dict[str, list[ExportLinear]] = collections.defaultdict(list)
    for it in items:
        if it.expert is not None and it.fmt is not None:
            moe[it.expert[0]].append(it)
    for members in moe.values():
        leaves = list(dict.fromkeys(x.expert[2] for x in members))
        fused = fused_sibling_groups(leaves)
        singles = [(leaf,) for leaf in leaves if not any(leaf in g for g in fused)]
        for group in fused + singles:
            grp = [x for x in members if x.expert[2] in group]
            _share_max(grp, "in_amax")
            if len(group) < 2:
                continue
            by_e: dict[int, list[ExportLinear]] = collections.defaultdict(list)
            for x in grp:
                by_e[x.expert[1]].append(x)
            for same_e in by_e.values():
                if len({p.fmt for p in same_e}) == 1 and not formats.get(same_e[0].fmt).per_channel:
                    _share_max(same_e, "w_amax")


__all__ = ["ExportLinear", "ExpertWeight", "SiteWeight", "Walked", "config_of", "hf_order_key", "name_map_of",
           "natural_key", "unify", "walk"]
