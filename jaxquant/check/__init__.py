"""Validate a ModelOpt unified HF checkpoint against what serving engines' loaders require.

``validate_checkpoint(dir)`` reads config.json, hf_quant_config.json, every safetensors header and
the scale tensors (small), never the packed weights unless ``deep=True``, and returns a ``Report``
of ``Finding(key, rule, message)``. Works on any exporter's output (jaxquant, nvidia-modelopt,
NVIDIA's published checkpoints) and on a directory still under its temporary name.

Modules: ``report`` (Finding, Report, the rule catalogue), ``reader`` (opening the directory, bit-level
value scans), ``rules`` (the checks). The command is ``jaxquant check DIR`` (jaxquant/cli_check.py);
docs/export.md lists the rules with their vLLM sources.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxquant.check import rules as R
from jaxquant.check.reader import Unreadable, open_checkpoint
from jaxquant.check.report import INTEGRITY_RULES, RULES, Finding, Report

__all__ = ["INTEGRITY_RULES", "RULES", "Finding", "Report", "validate_checkpoint"]


def validate_checkpoint(directory: str | os.PathLike, *, deep: bool = False) -> Report:
    """Check the checkpoint in ``directory``; never raises for a bad checkpoint.

    Args:
      directory: a checkpoint directory (config.json + safetensors; hf_quant_config.json for
        ModelOpt-format ones). Its name does not matter.
      deep: also decode every FP8 / unquantized weight and report NaN/Inf (reads all the weights).

    Returns:
      A ``Report``: ``ok`` when nothing was found; ``unreadable`` when config.json, a JSON config or a
      safetensors header cannot be read (then the other rules did not run).
    """
    try:
        ck = open_checkpoint(directory)
    except Unreadable as e:
        return Report(directory=Path(directory), findings=[Finding(e.key, "unreadable", e.message)], unreadable=True)
    v = R.build_view(ck)
    quantized = [m for m, lin in v.linears.items() if lin.family is not None]
    report = Report(directory=ck.directory, quant_algo=v.algo, kv_cache_quant_algo=v.kv,
                    n_tensors=len(ck.infos), n_quantized=len(quantized), deep=deep)
    kv_tensors = any(n.endswith((".k_scale", ".v_scale")) for n in ck.infos)
    if not v.declared:
        if not quantized and not kv_tensors:
            report.findings.append(Finding("config.json", "not-quantized",
                                           "no hf_quant_config.json, no quantization_config and no quantized tensor: "
                                           "this is not a quantized checkpoint. Quantize it (jaxquant ptq) first."))
            return report
        report.findings.append(Finding("hf_quant_config.json", "quant-config-missing",
                                       f"{len(quantized)} quantized linear(s) but neither hf_quant_config.json nor "
                                       "config.json's quantization_config declares the format: engines load the "
                                       "packed weights as plain ones. Re-export the checkpoint."))
    elif not quantized and not kv_tensors and v.algo is not None:
        report.findings.append(Finding("model.safetensors", "not-quantized",
                                       f"quant_algo is {v.algo} but no linear holds quantized tensors (a recipe that "
                                       "matched nothing?). Re-quantize, or drop the quantization config."))
    if v.declared:
        report.findings += R.check_config(v)
        report.findings += R.check_exclude_entries(v)
    report.findings += R.check_linears(v)
    report.findings += R.check_fused(v)
    report.findings += R.check_kv(v)
    if deep:
        report.findings += R.check_deep(v)
    return report
