"""After the calibration forward passes: checks, MoE expert sync and fallbacks, fused-sibling unification.

Everything here is a pure function of the calibration state (``{"<name>._amax": array}``, see
``state.py``) and the resolved configs (``{quantizer name: QuantizerConfig | None}``), so it can be
tested on hand-built states and applied to any model whose quantizers follow ModelOpt's names.

Steps (``finalize``), in ModelOpt's order:

1. **Non-finite check.** NaN or Inf in any amax raises ``NonFiniteError`` naming the quantizers
   (ModelOpt's max calibrator asserts the same).
2. **MoE input sync** (``layer_sync_moe_local_experts_amax``, spec §3 step 4): for every layer, the
   data-calibrated ``input_quantizer`` amax of each projection becomes the max over that layer's
   experts (``...experts.{e}.gate_proj.input_quantizer`` for all ``e``). Experts that received no
   token (amax still ``UNCALIBRATED``, or 0) thereby get the sibling max (ModelOpt's export-time
   ``set_expert_quantizer_amax``, spec §5.1). If no expert of the layer saw a token, every expert gets ModelOpt's fallback
   ``0.5``. Never a zero or NaN scale: serving engines reject those (vLLM #45320).
   Weight amax of uncalibrated experts needs nothing: it comes from the weights.
   With ``sync_expert_weight_amax`` the weight amax is synchronised the same way.
3. **Fused siblings** (spec §5.4): modules that serving engines fuse into one GEMM — ``q/k/v_proj``,
   ``gate/up_proj`` and Mixtral's ``w1/w3``, each expert separately — get the max of their per-tensor
   ``input`` amax and of their per-tensor ``weight`` amax (for static NVFP4 weights: their
   ``_global_amax``), when their weights are NVFP4 (dynamic or static; not FP8, which ModelOpt
   deliberately leaves alone). ModelOpt finds these groups at export by the identity of the shared
   input tensor (a dummy forward with hooks); JAX has no tensor identity, so groups are found by
   name with ModelOpt's own calibration-time patterns (``SHARED_PATTERNS``). For the decoders
   jaxquant implements the two are the same groups: q/k/v read the same normed hidden states,
   gate/up the same MLP input, and nothing else shares those inputs except MoE routers, whose
   quantizers are disabled (an unquantized module never joins a group in ModelOpt either).
   Doing it at calibration time (rather than only at export) means the fake-quantized model
   evaluates with exactly the scales the exported checkpoint will hold.
   A group whose members have different formats (for example NVFP4 ``q_proj`` next to FP8
   ``k_proj``) is reported as a conflict: ModelOpt's export asserts on it ("Modules have
   different quantization formats").
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxquant.calibration.state import AMAX, GLOBAL_AMAX
from jaxquant.errors import NonFiniteError
from jaxquant.formats.registry import QUANTIZER_FORMATS, quantizer_format
from jaxquant.quantizer.config import QuantizerConfig

#: ModelOpt's ``utils/shared_input.py::SHARED_PATTERNS``, full-matched on module names.
SHARED_PATTERNS: tuple[str, ...] = (
    r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)",
    r"(?:(.*)\.)?(?:gate_proj|up_proj)",
    r"(?:(.*)\.)?(?:w1|w3)",
)
#: ``set_expert_quantizer_amax``'s last-resort input amax (spec §5.1).
MOE_FALLBACK_AMAX = 0.5
#: Weight formats whose fused siblings are unified (ModelOpt excludes FP8 and unquantized).
FUSED_WEIGHT_FORMATS = tuple(n for n, q in QUANTIZER_FORMATS.items() if q.fused_weight_amax)

_EXPERT_RE = re.compile(r"^(?P<pre>.*\.experts?)\.(?P<e>\d+)\.(?P<post>.+)$")


@dataclasses.dataclass
class FinalizeReport:
    """What ``finalize`` changed.

    Attributes:
      moe_groups: number of (layer, projection) expert input groups synchronised.
      uncalibrated_experts: ``{layer group: [expert ids]}`` experts whose input amax was 0
        (they received no calibration token) and now hold the sibling max.
      moe_fallbacks: groups where no expert saw a token; every expert got ``MOE_FALLBACK_AMAX``.
      fused_groups: the unified sibling groups (module names).
      fused_conflicts: ``(module names, formats)`` of sibling groups with mixed formats (not
        unified; an export of them would fail in ModelOpt).
      zero_amax: activation quantizers (not experts) that saw no non-zero value (amax 0, or still the
        ``UNCALIBRATED`` placeholder when they saw no token at all: ``export_hf`` refuses those).
    """

    moe_groups: int = 0
    uncalibrated_experts: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    moe_fallbacks: list[str] = dataclasses.field(default_factory=list)
    fused_groups: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    fused_conflicts: list[tuple[tuple[str, ...], tuple[str, ...]]] = dataclasses.field(default_factory=list)
    zero_amax: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """A few lines for humans."""
        lines = []
        if self.moe_groups:
            n_unc = sum(len(v) for v in self.uncalibrated_experts.values())
            lines.append(f"MoE: expert input amax synchronised in {self.moe_groups} group(s); "
                         f"{n_unc} expert input(s) had received no token and use the sibling max")
        for g in self.moe_fallbacks:
            lines.append(f"MoE: no expert of {g} received a token; input amax set to the fallback "
                         f"{MOE_FALLBACK_AMAX}")
        if self.fused_groups:
            lines.append(f"fused siblings (q/k/v, gate/up): {len(self.fused_groups)} NVFP4 group(s) share "
                         "their input and weight amax")
        for names, fmts in self.fused_conflicts:
            lines.append("fused siblings with different formats (not unified; ModelOpt's export rejects "
                         "them): " + ", ".join(f"{n} ({f})" for n, f in zip(names, fmts)))
        if self.zero_amax:
            lines.append(f"{len(self.zero_amax)} activation quantizer(s) saw no non-zero value, e.g. "
                         f"{self.zero_amax[0]}")
        return "\n".join(lines)


def _fmt(cfg: QuantizerConfig | None) -> str | None:
    return cfg.format if cfg is not None and cfg.enable else None


def check_finite(state: Mapping[str, Any], *, where: str = "") -> None:
    """Raise ``NonFiniteError`` naming the quantizers whose amax holds NaN or Inf."""
    bad = [k for k, v in state.items() if not np.all(np.isfinite(np.asarray(v, np.float32)))]
    if bad:
        names = sorted(k.rsplit(".", 1)[0] for k in bad)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise NonFiniteError(
            f"calibration produced NaN or Inf amax{where} for {len(names)} quantizer(s): {shown}. "
            "The model produced non-finite activations (or holds non-finite weights) on the calibration "
            "data; check the checkpoint and the dtype (float16 overflows easily; try --dtype bfloat16 "
            "or float32)."
        )


def sync_moe_experts(state: dict[str, np.ndarray], configs: Mapping[str, QuantizerConfig | None],
                     report: FinalizeReport, *, sync_weight_amax: bool = False) -> None:
    """Step 2 of the module doc, in place on ``state``."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for key in state:
        if not key.endswith("." + AMAX):
            continue
        name = key[: -len(AMAX) - 1]
        m = _EXPERT_RE.match(name)
        if m is None:
            continue
        post = m.group("post")
        role_ok = post.endswith("input_quantizer") or (sync_weight_amax and post.endswith("weight_quantizer"))
        if not role_ok:
            continue
        cfg = configs.get(name)
        if post.endswith("input_quantizer") and (cfg is None or not cfg.needs_calibration):
            continue
        groups.setdefault((m.group("pre"), post), {})[int(m.group("e"))] = key
    for (pre, post), members in sorted(groups.items()):
        vals = [np.asarray(state[k], np.float32) for k in members.values()]
        shapes = {v.shape for v in vals}
        if len(shapes) != 1:
            continue
        label = f"{pre}.*.{post}"
        is_input = post.endswith("input_quantizer")
        if is_input:
            unc = sorted(e for e, k in members.items() if not np.any(np.asarray(state[k]) > 0))
            if unc:
                report.uncalibrated_experts[label] = unc
        top = np.max(np.stack(vals), axis=0)
        if is_input and not np.any(top > 0):
            top = np.full_like(top, MOE_FALLBACK_AMAX)
            report.moe_fallbacks.append(label)
        for k in members.values():
            state[k] = top.copy()
        report.moe_groups += is_input


def _module_of(quantizer_name: str) -> tuple[str, str] | None:
    for leaf in ("input_quantizer", "weight_quantizer"):
        if quantizer_name.endswith("." + leaf):
            return quantizer_name[: -len(leaf) - 1], leaf
    return None


def fused_sibling_groups(module_names: Sequence[str],
                         patterns: Sequence[str] = SHARED_PATTERNS) -> list[tuple[str, ...]]:
    """Modules that share one input, by ModelOpt's ``SHARED_PATTERNS`` (grouped per parent and
    pattern); only groups of two or more, members in input order."""
    compiled = [re.compile(p) for p in patterns]
    groups: dict[tuple[int, str], list[str]] = {}
    for name in module_names:
        for i, rx in enumerate(compiled):
            m = rx.fullmatch(name)
            if m is not None:
                groups.setdefault((i, m.group(1) or ""), []).append(name)
                break
    return [tuple(v) for v in groups.values() if len(v) > 1]


def unify_fused_siblings(state: dict[str, np.ndarray], configs: Mapping[str, QuantizerConfig | None],
                         report: FinalizeReport, *, patterns: Sequence[str] = SHARED_PATTERNS) -> None:
    """Step 3 of the module doc, in place on ``state``."""
    modules: list[str] = []
    seen = set()
    for name in configs:
        mod = _module_of(name)
        if mod is not None and mod[0] not in seen:
            seen.add(mod[0])
            modules.append(mod[0])
    for group in fused_sibling_groups(modules, patterns):
        wcfgs = [configs.get(f"{m}.weight_quantizer") for m in group]
        icfgs = [configs.get(f"{m}.input_quantizer") for m in group]
        wf = [_fmt(c) for c in wcfgs]
        inf = [_fmt(c) for c in icfgs]
        if not any(f in FUSED_WEIGHT_FORMATS for f in wf):
            continue
        if len(set(zip(wf, inf))) > 1:
            fmts = tuple(f"weight {w or 'off'}, input {i or 'off'}" for w, i in zip(wf, inf))
            report.fused_conflicts.append((group, fmts))
            continue
        # inputs: per-tensor, data-calibrated amax only
        if icfgs[0] is not None and icfgs[0].needs_calibration:
            keys = [f"{m}.input_quantizer.{AMAX}" for m in group]
            if all(k in state and np.size(state[k]) == 1 for k in keys):
                top = max(float(np.asarray(state[k]).reshape(())) for k in keys)
                for k in keys:
                    state[k] = np.asarray(top, np.float32).reshape(np.shape(state[k]))
        # weights: static blocks share the global amax; dynamic NVFP4 the per-tensor amax
        if quantizer_format(wf[0]).has_global_amax:
            keys = [f"{m}.weight_quantizer.{GLOBAL_AMAX}" for m in group]
        else:
            keys = [f"{m}.weight_quantizer.{AMAX}" for m in group]
        if all(k in state and np.size(state[k]) == 1 for k in keys):
            top = max(float(np.asarray(state[k]).reshape(())) for k in keys)
            for k in keys:
                state[k] = np.asarray(top, np.float32).reshape(np.shape(state[k]))
        report.fused_groups.append(group)


def finalize(state: Mapping[str, Any], configs: Mapping[str, QuantizerConfig | None], *,
             sync_moe: bool = True, sync_expert_weight_amax: bool = False, unify_fused: bool = True,
             shared_patterns: Sequence[str] = SHARED_PATTERNS, warn: bool = True,
             ) -> tuple[dict[str, np.ndarray], FinalizeReport]:
    """Checks, MoE sync + fallbacks and fused-sibling unification (module doc). Returns a new
    state and a report; ``state`` is not modified.

    Args:
      state: ``{"<name>._amax" | "<name>._global_amax": array}``.
      configs: every quantizer name -> its resolved config (None when disabled).
      sync_moe: synchronise expert input amax (ModelOpt skips it only with
        ``moe_calib_experts_ratio``, which jaxquant does not implement).
      sync_expert_weight_amax: also synchronise expert weight amax (ModelOpt's option).
      unify_fused: unify NVFP4 fused siblings.
      shared_patterns: the sibling patterns (``algorithm.shared_states.weight_global_amax.patterns``).

    Raises:
      NonFiniteError: NaN / Inf in the state.
    """
    out = {k: np.array(v, np.float32) for k, v in state.items()}
    check_finite(out)
    report = FinalizeReport()
    if sync_moe:
        sync_moe_experts(out, configs, report, sync_weight_amax=sync_expert_weight_amax)
    if unify_fused:
        unify_fused_siblings(out, configs, report, patterns=shared_patterns)
    for key, v in out.items():
        name = key[: -len(AMAX) - 1] if key.endswith("." + AMAX) else None
        if name is None or name.endswith("weight_quantizer") or _EXPERT_RE.match(name):
            continue
        if not np.any(v > 0):
            report.zero_amax.append(name)
    if warn:
        for g in report.moe_fallbacks:
            warnings.warn(f"no expert of {g} received a calibration token; its input amax is ModelOpt's "
                          f"fallback {MOE_FALLBACK_AMAX}. Calibrate with more data.", stacklevel=2)
        for names, _ in report.fused_conflicts:
            warnings.warn(f"fused siblings {', '.join(names)} have different quantization formats; "
                          "their amax is not unified and ModelOpt's export format cannot represent them.",
                          stacklevel=2)
    return out, report


def site_configs(sites) -> dict[str, QuantizerConfig | None]:
    """``{ModelOpt name: config}`` for every instance of every site (None when disabled)."""
    out: dict[str, QuantizerConfig | None] = {}
    for s in sites:
        for n in s.names:
            out[n] = s.config
    return out


__all__ = [
    "FUSED_WEIGHT_FORMATS",
    "FinalizeReport",
    "MOE_FALLBACK_AMAX",
    "SHARED_PATTERNS",
    "check_finite",
    "finalize",
    "fused_sibling_groups",
    "site_configs",
    "sync_moe_experts",
    "unify_fused_siblings",
]
