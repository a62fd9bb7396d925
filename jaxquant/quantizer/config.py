"""Quantizer attribute configs: ModelOpt's ``QuantizerAttributeConfig`` as a frozen dataclass.

A ``QuantizerConfig`` says *how* one tensor is quantized (its format); it carries no state. The
recipe matcher resolves one config (or ``None`` = disabled) per quantizer name, and a
``TensorQuantizer`` holds it as static metadata next to its calibrated ``amax``.

Field names, defaults and spellings follow ModelOpt (spec modelopt.md §1.3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

NumBits = int | tuple[int, int]

E4M3 = (4, 3)
E2M1 = (2, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """ModelOpt ``block_sizes``: one quantization block along one axis.

    Attributes:
      size: elements per block along ``axis`` (16 for NVFP4), or None for "whole axis"
        (per-token dynamic).
      axis: the blocked axis; ModelOpt's dynamic blocks support only the last axis (-1).
      type: "dynamic" (per-block scales recomputed every call; only the global amax is calibrated)
        or "static" (per-block amax calibrated and stored).
      scale_bits: format of the per-block scales, (4, 3) for NVFP4's e4m3 scales, (8, 0) for MX.
    """

    size: int | None
    axis: int = -1
    type: Literal["static", "dynamic"] = "static"
    scale_bits: NumBits | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizerConfig:
    """One quantizer's attributes (ModelOpt ``QuantizerAttributeConfig``).

    Attributes mirror ModelOpt's defaults: an enabled quantizer that no ``cfg`` ever touched is
    INT8 per-tensor (num_bits=8, axis=None).
    """

    enable: bool = True
    num_bits: NumBits = 8
    axis: int | tuple[int, ...] | None = None
    block_sizes: BlockSizes | None = None
    fake_quant: bool = True
    unsigned: bool = False
    narrow_range: bool = False
    type: Literal["static", "dynamic"] = "static"
    calibrator: str = "max"
    pass_through_bwd: bool = True
    use_constant_amax: bool = False
    constant_amax: float | None = None
    effective_bits: float | None = None
    # Accepted for schema compatibility; jaxquant does not act on them (yet).
    bias: Any = None
    rotate: Any = False
    trt_high_precision_dtype: str = "Float"
    backend: str | None = None
    backend_extra_args: Any = None

    # ----------------------------------------------------------------- derived properties
    @property
    def format(self) -> str:
        """Short format name: 'fp8', 'fp8_per_channel', 'nvfp4', 'nvfp4_static', or a descriptive
        name of a format jaxquant does not implement (e.g. 'int8', 'mxfp4', 'int4_block128')."""
        bs = self.block_sizes
        if self.num_bits == E4M3 and bs is None:
            return "fp8" if self.axis is None else "fp8_per_channel"
        if self.num_bits == E2M1 and bs is not None and bs.scale_bits == E4M3 and bs.axis == -1:
            if bs.size == 16:
                return "nvfp4" if bs.type == "dynamic" else "nvfp4_static"
            return f"nvfp4_bs{bs.size}"
        if self.num_bits == E2M1 and bs is not None and bs.scale_bits == (8, 0):
            return "mxfp4"
        if self.num_bits == E4M3 and bs is not None:
            return "mxfp8" if bs.scale_bits == (8, 0) else "fp8_block"
        if isinstance(self.num_bits, int):
            kind = f"int{self.num_bits}"
            if bs is not None:
                return f"{kind}_block{bs.size}"
            return kind if self.axis is None else f"{kind}_per_channel"
        return f"e{self.num_bits[0]}m{self.num_bits[1]}"

    @property
    def is_dynamic(self) -> bool:
        """True when no calibration is needed at all (top-level ``type: dynamic``)."""
        return self.type == "dynamic"

    @property
    def needs_calibration(self) -> bool:
        """True when an activation quantizer with this config collects amax from data."""
        return not (self.is_dynamic or self.use_constant_amax or self.constant_amax is not None)

    @property
    def fixed_amax(self) -> float | None:
        """The pinned amax of a constant-amax quantizer (448 for KV "cast"), else None."""
        if self.use_constant_amax:
            return 448.0
        return self.constant_amax


SUPPORTED_FORMATS = ("fp8", "fp8_per_channel", "nvfp4", "nvfp4_static")
