"""Quantizer sites for a user's own Flax NNX model built from ``nnx.Linear``.

``attach_quantizers(model)`` gives every ``nnx.Linear`` of the model ModelOpt's three quantizers
(``input_quantizer``, ``weight_quantizer``, ``output_quantizer``) by turning it, in place, into a
``QuantizedLinear`` (a subclass: same object, same path, same ``kernel``/``bias`` parameters). The
quantizer names are then the NNX paths (``blocks.0.attn.q_proj.weight_quantizer``), so ModelOpt
recipes match them as they match the HF module names of jaxquant's own decoders, and the rest of
jaxquant (``apply_recipe``, ``quantize``, ``prepare_qat``, calibration state) works unchanged.

Layout. Flax stores the kernel ``[in, out]``; ModelOpt's quantizers see torch's ``[out, in]``.
The weight quantizer is therefore applied to ``kernel.T``: NVFP4 blocks of 16 run along the input
features (Flax's axis 0, as they must), and per-channel FP8 (``axis: 0``) is per output feature.
``weight_of`` / ``quantizer_tensor_shape`` expose that view to calibration and ``apply_recipe``.

Order (ModelOpt's ``QuantLinear``): ``output_quantizer(input_quantizer(x) @ weight_quantizer(W) + b)``.
``nnx.Linear``'s ``dtype`` promotion, ``dot_general`` injection and ``precision`` are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.qat.quantizer import QATQuantizer


class QuantizedLinear(nnx.Linear):
    """``nnx.Linear`` with ModelOpt's quantizer sites (made by ``attach_quantizers``)."""

    modelopt_class = "nn.Linear"

    def weight_param_name(self, attr: str) -> str:
        """The parameter behind the weight quantizer: ``kernel``."""
        return "kernel"

    def weight_of(self, attr: str) -> jax.Array:
        """The tensor the weight quantizer sees: ``kernel.T`` (``[out, in]``)."""
        return self.kernel[...].T

    def quantizer_tensor_shape(self, attr: str) -> tuple[int, ...] | None:
        if attr == "weight_quantizer":
            i, o = self.kernel.shape
            return (o, i)
        return None

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        inputs = self.input_quantizer(inputs)
        kernel = self.weight_quantizer(kernel.T).T
        kwargs = {"out_sharding": out_sharding}
        if self.preferred_element_type is not None:
            kwargs["preferred_element_type"] = self.preferred_element_type
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                             precision=self.precision, **kwargs)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return self.output_quantizer(y)


def attach_quantizers(model: nnx.Module) -> list[str]:
    """Turn every ``nnx.Linear`` of ``model`` into a ``QuantizedLinear`` in place.

    The new quantizers are disabled until a recipe configures them (``apply_recipe``,
    ``quantize`` or ``prepare_qat``). Linears that already have quantizers are left alone.

    Returns:
      the dotted NNX paths of the converted linears.
    """
    done = []
    for path, m in nnx.iter_modules(model):
        if not isinstance(m, nnx.Linear) or isinstance(m, QuantizedLinear):
            continue
        m.__class__ = QuantizedLinear
        m.input_quantizer = QATQuantizer()
        m.weight_quantizer = QATQuantizer()
        m.output_quantizer = QATQuantizer()
        done.append(".".join(str(p) for p in path))
    return done


__all__ = ["QuantizedLinear", "attach_quantizers"]
