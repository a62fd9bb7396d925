"""``QATQuantizer``: a ``TensorQuantizer`` for training (ModelOpt's STE options, dynamic or learnable amax).

``prepare_qat`` turns every ``TensorQuantizer`` of a model into a ``QATQuantizer`` in place (the
module keeps its identity, path, config, mode and amax; only its class changes), so the model's
structure, quantizer names, calibration state and export stay exactly those of the PTQ model.

In ``fake_quant`` mode it computes ``jaxquant.qat.ste.fake_quant``: the same forward bits as
``TensorQuantizer``, with

* ``pass_through_bwd`` of the quantizer's config honoured (identity gradient, or zero outside
  ``[-amax, amax]``);
* ``amax_mode == "dynamic"``: amax is ``max|x|`` of the current tensor (over real tokens), under
  ``stop_gradient``, recomputed every call (ModelOpt's behaviour for a quantizer without a
  calibrated ``_amax``); the stored amax is not used (nor changed);
* a ``LearnableAmax`` variable (``learn_amax``): a trainable amax with LSQ's gradient.

Every other mode (``off``, ``calibrate``) is ``TensorQuantizer``'s.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxquant.qat.ste import fake_quant
from jaxquant.quantizer.tensor_quantizer import QuantAmax, TensorQuantizer

AmaxMode = Literal["static", "dynamic"]


class LearnableAmax(QuantAmax):
    """A trainable amax. Still a ``QuantAmax`` (calibration state, export and ``finish_qat`` see
    it), but not an ``nnx.Param``: add it to the optimizer explicitly, e.g.
    ``nnx.Optimizer(model, tx, wrt=nnx.Any(nnx.Param, LearnableAmax))``."""


class QATQuantizer(TensorQuantizer):
    """A ``TensorQuantizer`` with training options (module doc). Build it with
    ``QATQuantizer.convert(quantizer)`` (in place) or like a ``TensorQuantizer``."""

    def __init__(self, *, instances: int | None = None, amax_mode: AmaxMode = "static"):
        super().__init__(instances=instances)
        self.amax_mode: AmaxMode = amax_mode

    @classmethod
    def convert(cls, q: TensorQuantizer, *, amax_mode: AmaxMode = "static") -> QATQuantizer:
        """Make ``q`` a ``QATQuantizer`` in place (same object, config, mode and amax)."""
        if amax_mode not in ("static", "dynamic"):
            raise ValueError(f"amax_mode must be 'static' or 'dynamic', got {amax_mode!r}")
        if not isinstance(q, cls):
            q.__class__ = cls
        q.amax_mode = amax_mode
        return q

    @property
    def learnable(self) -> bool:
        return isinstance(self.amax, LearnableAmax)

    def make_learnable(self, learnable: bool = True):
        """Turn the amax variable into a ``LearnableAmax`` (or back into a ``QuantAmax``)."""
        if self.amax is None:
            return
        if learnable and not isinstance(self.amax, LearnableAmax):
            self.amax = LearnableAmax(self.amax.value)
        elif not learnable and isinstance(self.amax, LearnableAmax):
            self.amax = QuantAmax(self.amax.value)

    def _dynamic_amax(self, x: jax.Array, token_mask) -> tuple[jax.Array, Any]:
        amax = jax.lax.stop_gradient(self.reduce_amax(x, token_mask))
        ga = None
        if self.global_amax is not None:  # static NVFP4: global = max over the blocks (per instance)
            axes = tuple(range(1 if self.instances else 0, amax.ndim))
            ga = jnp.max(amax, axis=axes, keepdims=bool(self.instances))
        return amax, ga

    def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None) -> jax.Array:
        if not self.enabled or self.mode != "fake_quant":
            return super().__call__(x, token_mask=token_mask)
        x = self.scaled(x)  # SmoothQuant / AWQ pre_quant_scale (a constant: not trained)
        cfg = self.config
        if self.amax_mode == "dynamic" and cfg.fixed_amax is None:
            amax, ga = self._dynamic_amax(x, token_mask)
        else:
            amax = self.amax.value
            ga = self.global_amax.value if self.global_amax is not None else None
        return fake_quant(cfg.format, self.block_size, x, amax, ga, cfg.pass_through_bwd)


__all__ = ["AmaxMode", "LearnableAmax", "QATQuantizer"]
