"""What ``validate_checkpoint`` returns: a list of findings, each naming a tensor or JSON key, a
stable rule id and what to do.

``RULES`` is the catalogue of rule ids (id -> what it checks); docs/export.md lists the same ids
with the vLLM source each one comes from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxquant.errors import CheckpointError

#: Every rule id a finding can carry, with what it checks (docs/export.md has the sources).
RULES: dict[str, str] = {
    "unreadable": "config.json, the JSON configs and the safetensors headers can be read",
    "not-quantized": "the checkpoint holds quantized tensors or declares a quantization at all",
    "quant-config-missing": "quantized tensors come with hf_quant_config.json",
    "quant-algo-unsupported": "quant_algo is one vLLM's ModelOpt loader accepts",
    "kv-algo-unsupported": "kv_cache_quant_algo is FP8, NVFP4 or null",
    "mixed-layers-empty": "MIXED_PRECISION has a non-empty quantized_layers",
    "mixed-layer-algo-unsupported": "each MIXED_PRECISION layer is FP8, NVFP4 or W4A16_NVFP4",
    "mixed-layer-missing": "each quantized linear of a MIXED_PRECISION checkpoint is listed in quantized_layers",
    "required-key-missing": "hf_quant_config.json has quant_algo, kv_cache_quant_algo, group_size (NVFP4) and "
                            "exclude_modules (single format), even when null",
    "config-mismatch": "config.json quantization_config agrees with hf_quant_config.json",
    "format-mismatch": "each linear's packed tensors have the dtype of its declared format",
    "fused-format-mismatch": "q/k/v, gate/up and expert w1/w3 share one format",
    "fused-scale-mismatch": "NVFP4 q/k/v, gate/up and expert w1/w3 share one weight_scale_2 and input_scale",
    "scale-missing": "a quantized linear has every scale tensor of its format",
    "scale-unexpected": "no input_scale on weight-only formats; pre_quant_scale only on AWQ / SmoothQuant formats",
    "scale-dtype": "scale tensors have the dtype of their format",
    "scale-shape": "weights and scales have the shapes of their format",
    "scale-nonfinite": "no NaN/Inf in any scale (per tensor or per block)",
    "scale-nonpositive": "per-tensor scales and pre_quant_scale > 0; block scales >= 0",
    "expert-input-scale": "every MoE expert of a static-activation format has a finite, positive input_scale",
    "kv-scale-missing": "with kv_cache_quant_algo set, every attention layer that owns a KV cache has "
                        "k_scale and v_scale (or none does: the *_cast variants)",
    "kv-scale-unexpected": "no k_scale/v_scale when kv_cache_quant_algo is null",
    "kv-bias-unexpected": "an affine KV bias (k_bias / v_bias) comes with its k_scale / v_scale",
    "exclude-unmatched": "every exclude_modules entry matches a module of the checkpoint",
    "exclude-missing": "every unquantized linear (lm_head included) is matched by exclude_modules",
    "exclude-matches-quantized": "no quantized linear is matched by exclude_modules",
    "lm-head-quantized-excluded": "lm_head is not quantized while exclude_modules matches it (vllm#45102)",
    "weight-nonfinite": "(--deep) no NaN/Inf in FP8 or unquantized weights",
}

#: Rules whose findings mean the stored numbers themselves are wrong or missing (values, dtypes,
#: shapes, scales): no loader can compute the intended model from such a checkpoint, so
#: ``load_quantized`` refuses it. The other rules are about what serving engines accept (configs,
#: exclusions, fused-sibling agreement); a loader only warns about those, the exporter refuses all.
INTEGRITY_RULES: frozenset[str] = frozenset({
    "unreadable", "format-mismatch", "scale-missing", "scale-dtype", "scale-shape", "scale-nonfinite",
    "scale-nonpositive", "expert-input-scale", "kv-scale-missing", "weight-nonfinite",
})


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: ``key`` (tensor name, ``file:json.key`` or file), ``rule`` (an id of ``RULES``),
    ``message`` (what is wrong and what to do)."""

    key: str
    rule: str
    message: str

    def format(self) -> str:
        """``<key>: [<rule>] <message>``."""
        return f"{self.key}: [{self.rule}] {self.message}"


@dataclasses.dataclass
class Report:
    """The result of ``validate_checkpoint``.

    ``ok`` is true when there is no finding. ``unreadable`` is true when the checkpoint could not
    be read at all (the findings then name the file); the other rules did not run.
    """

    directory: Path
    findings: list[Finding] = dataclasses.field(default_factory=list)
    unreadable: bool = False
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    n_tensors: int = 0
    n_quantized: int = 0
    deep: bool = False

    @property
    def ok(self) -> bool:
        return not self.findings and not self.unreadable

    @property
    def rules(self) -> set[str]:
        """The rule ids that have findings."""
        return {f.rule for f in self.findings}

    def format(self) -> str:
        """One line per finding (empty string when there is none)."""
        return "\n".join(f.format() for f in self.findings)

    def summary(self) -> str:
        """One line: what was checked and how many findings."""
        if self.unreadable:
            return f"{self.directory}: unreadable checkpoint ({len(self.findings)} finding(s))"
        what = (f"quant_algo {self.quant_algo}, kv_cache_quant_algo {self.kv_cache_quant_algo}, "
                f"{self.n_quantized} quantized linear(s), {self.n_tensors} tensors"
                + (", weights decoded (--deep)" if self.deep else ""))
        if self.ok:
            return f"{self.directory}: OK ({what})"
        n = len(self.findings)
        return f"{self.directory}: {n} finding{'s' if n != 1 else ''} in {len(self.rules)} rule(s) ({what})"

    def raise_if_findings(self, limit: int = 5) -> None:
        """Raise ``CheckpointError`` naming the first ``limit`` findings; do nothing when ``ok``."""
        if self.ok:
            return
        head = "; ".join(f.format() for f in self.findings[:limit])
        more = len(self.findings) - limit
        tail = f"; and {more} more (run `jaxquant check {self.directory}`)" if more > 0 else ""
        kind = "cannot be read" if self.unreadable else "fails validation"
        raise CheckpointError(f"checkpoint {self.directory} {kind}: {head}{tail}")
