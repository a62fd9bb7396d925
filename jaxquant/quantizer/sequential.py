"""Sequential quantizers: ModelOpt's ``SequentialQuantizer``, a list ``cfg`` that applies several quantizers to one
tensor in turn (``w4a8_awq_beta``'s weights: INT4 blocks, then FP8 per tensor).

A recipe rule whose ``cfg`` is a list resolves to a tuple of ``QuantizerConfig`` (so resolution compares with
ModelOpt's quantizer by quantizer). ``as_quantizer_config`` turns that tuple into one ``SequentialConfig`` that a
``TensorQuantizer`` holds like any config: its ``format`` joins the parts' formats with ``+``
(``"int4_block128+fp8"``) and names the ``QuantizerFormat`` that calibrates and fake-quantizes the whole chain.
Chains jaxquant has no ``QuantizerFormat`` for report an ``unsupported_reason`` naming them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxquant.quantizer.config import SUPPORTED_FORMATS, QuantizerConfig


@dataclasses.dataclass(frozen=True)
class SequentialConfig:
    """Several quantizers applied in order to one tensor (ModelOpt ``SequentialQuantizer``).

    The attributes a ``TensorQuantizer`` reads are those of the chain: ``format`` (``"int4_block128+fp8"``),
    ``block_sizes`` / ``num_bits`` / ``axis`` of the first part (the one with the finest granularity, whose amax
    the quantizer holds), calibrated (never dynamic or constant).
    """

    parts: tuple[QuantizerConfig, ...]

    @property
    def enable(self) -> bool:
        return any(p.enable for p in self.parts)

    @property
    def format(self) -> str:
        return "+".join(p.format for p in self.parts)

    @property
    def block_sizes(self):
        return self.parts[0].block_sizes

    @property
    def num_bits(self):
        return self.parts[0].num_bits

    @property
    def axis(self):
        return self.parts[0].axis

    @property
    def pass_through_bwd(self) -> bool:
        return all(p.pass_through_bwd for p in self.parts)

    type = "static"
    bias = None
    rotate = False
    rotation = None  # no Hadamard rotation on a chain
    fixed_amax = None
    use_constant_amax = False
    constant_amax = None
    is_dynamic = False
    needs_calibration = True

    @property
    def unsupported_reason(self) -> str | None:
        """None when jaxquant calibrates and fake-quantizes this chain, else why not."""
        if not all(p.enable for p in self.parts):
            return f"a sequential quantizer with disabled parts ({self.format})"
        if self.format not in SUPPORTED_FORMATS:
            return f"a sequential quantizer ({' then '.join(p.format for p in self.parts)})"
        for p in self.parts:
            reason = p.unsupported_reason
            if reason is not None:
                return reason
        return None

    def replace(self, **changes) -> SequentialConfig:
        """A copy with ``changes`` applied to every part (``enable=False`` disables the chain)."""
        return SequentialConfig(tuple(p.replace(**changes) for p in self.parts))

    def to_dict(self, *, exmy: bool = False, full: bool = False) -> list[dict[str, Any]]:
        """ModelOpt's list spelling: one attribute mapping per part."""
        return [p.to_dict(exmy=exmy, full=full) for p in self.parts]


def as_quantizer_config(cfg):
    """A resolved config as a ``TensorQuantizer`` holds it: a tuple of parts becomes one ``SequentialConfig``
    (a one-part tuple its only part); a ``QuantizerConfig`` or None is returned unchanged."""
    if isinstance(cfg, tuple):
        return cfg[0] if len(cfg) == 1 else SequentialConfig(cfg)
    return cfg


def config_from_dict(d) -> QuantizerConfig | SequentialConfig:
    """The inverse of ``to_dict`` for either kind: a mapping or a list of mappings (orbax metadata)."""
    if isinstance(d, (list, tuple)):
        return as_quantizer_config(tuple(QuantizerConfig.from_dict(p) for p in d))
    return QuantizerConfig.from_dict(d)


__all__ = ["SequentialConfig", "as_quantizer_config", "config_from_dict"]
