"""NVFP4 weights whose input carries an AWQ ``pre_quant_scale``: ModelOpt's ``nvfp4_awq`` (``quant_algo`` NVFP4_AWQ).

ModelOpt's ``get_quantization_format`` names an NVFP4 linear (dynamic blocks of 16, E4M3 block scales) ``nvfp4_awq``
as soon as its input quantizer holds a ``pre_quant_scale`` (what ``awq_lite`` / ``awq_full`` leave), with or without
quantized activations, and keeps the name after the export folded that scale away (``fused_with_prequant``). The
tensors are NVFP4's (``weight``, ``weight_scale``, ``weight_scale_2``, ``input_scale`` when the activations are
NVFP4) plus, where the scale was not folded, ``<linear>.pre_quant_scale`` (``export/prequant.py`` decides).

``hf_quant_config.json``: ``quant_algo`` NVFP4_AWQ with ``group_size`` 16, ``has_zero_point: false`` and
``pre_quant_scale: true``; ``config.json["quantization_config"]`` gets no ``config_groups`` when every layer is
NVFP4_AWQ, and in a MIXED_PRECISION group ModelOpt's entry (``input_activations`` 8-bit float, ``weights`` 4-bit float,
both with the group size; ``convert_hf_config._quant_algo_to_group_config``).

Static NVFP4 weights (per-block amax calibrated by ``mse`` / ``local_hessian`` / ``gptq``, e.g. after ``awq_lite``)
with a ``pre_quant_scale`` are NVFP4_AWQ too: ModelOpt's ``get_quantization_format`` asks only for FP4 weights and the
scale. Their block scales come from the per-block amax. Where the export re-smooths such a weight (fused siblings'
mean scale, o_proj / down_proj folded into v_proj / up_proj) ModelOpt re-collects the quantizer's per-block ``_amax``
from the new weight with max calibration and keeps its calibrated ``global_amax`` (so ``weight_scale_2``); so does
jaxquant (``resmooth_keeps_global_amax``).

These formats are never chosen from quantizer configs (``match`` is False): a linear of ``nvfp4`` / ``nvfp4_static`` /
``w4a16_nvfp4`` / ``w4a16_nvfp4_static`` becomes one of them through ``QuantFormat.pqs_format`` when it carries a
``pre_quant_scale``. Four-over-Six and 32-blocks NVFP4 with a ``pre_quant_scale`` stay refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jaxquant.formats.nvfp4 import NVFP4, NVFP4Static, W4A16NVFP4, W4A16NVFP4Static


class PreQuantScaledNVFP4:
    """Mixin: the ``NVFP4_AWQ`` identity over an NVFP4 format (module doc)."""

    quant_algo: ClassVar[str] = "NVFP4_AWQ"
    pqs_into_norm: ClassVar[bool] = True
    pqs_into_linear: ClassVar[bool] = True
    config_groups_when_uniform: ClassVar[bool] = False  # ModelOpt 0.47 writes none for NVFP4_AWQ

    def match(self, weight, input) -> bool:
        """Never from configs alone: the ``pre_quant_scale`` decides (``pqs_format`` of ``nvfp4`` / ``w4a16_nvfp4``)."""
        return False

    def hf_layer_entry(self, block: int) -> dict[str, Any]:
        return {"quant_algo": self.quant_algo, "group_size": block, "has_zero_point": False, "pre_quant_scale": True}

    def config_group(self, group_size=None) -> dict:
        gs = group_size or 128  # ModelOpt's default for NVFP4_AWQ / W4A8_AWQ groups
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float", "group_size": gs},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs}}


class NVFP4AWQ(PreQuantScaledNVFP4, NVFP4):
    """NVFP4 weights and activations with an AWQ ``pre_quant_scale`` (W4A4; ``input_scale = in_amax / 2688``)."""

    name = "nvfp4_awq"
    pqs_format = "nvfp4_awq"


class W4A16NVFP4AWQ(PreQuantScaledNVFP4, W4A16NVFP4):
    """NVFP4 weights with an AWQ ``pre_quant_scale``, unquantized activations (no ``input_scale``; ModelOpt still
    writes ``quant_algo`` NVFP4_AWQ)."""

    name = "w4a16_nvfp4_awq"
    pqs_format = "w4a16_nvfp4_awq"


class NVFP4StaticAWQ(PreQuantScaledNVFP4, NVFP4Static):
    """Static NVFP4 weights (calibrated per-block amax) and NVFP4 activations with an AWQ ``pre_quant_scale``."""

    name = "nvfp4_static_awq"
    pqs_format = "nvfp4_static_awq"


class W4A16NVFP4StaticAWQ(PreQuantScaledNVFP4, W4A16NVFP4Static):
    """Static NVFP4 weights with an AWQ ``pre_quant_scale``, unquantized activations (``quant_algo`` NVFP4_AWQ)."""

    name = "w4a16_nvfp4_static_awq"
    pqs_format = "w4a16_nvfp4_static_awq"


__all__ = ["NVFP4AWQ", "NVFP4StaticAWQ", "PreQuantScaledNVFP4", "W4A16NVFP4AWQ", "W4A16NVFP4StaticAWQ"]
