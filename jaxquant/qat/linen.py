"""QAT for Flax Linen models: a recipe applied to a params pytree, plus activation ``dot_general``s.

Linen modules are stateless functions of ``params``, so quantization is a transform of the
arguments rather than a change of the model::

    qat = LinenQAT(recipe, variables["params"])
    dense = nn.Dense(features, dot_general=qat.dot_general("decoder.layers_0.mlp.up"))  # activations
    def loss_fn(params, batch):
        logits = model.apply({"params": qat.fake_quant_params(params)}, batch)       # weights
        ...
    grads = jax.grad(loss_fn)(params, batch)       # straight-through: grads for the float params

Names are the params' paths (``sites_from_pytree``): a 2-D ``kernel`` (or ``weight``) leaf at
``decoder/layers_0/mlp/up/kernel`` is the linear ``decoder.layers_0.mlp.up`` with quantizers
``…up.weight_quantizer`` and ``…up.input_quantizer`` (parent class ``nn.Linear``), so ModelOpt
recipes match them; embedding leaves are ``nn.Embedding`` and ModelOpt's default rules leave
them alone.

What is covered, and how it differs from the NNX path:

* weights: every matched 2-D kernel ``[in, out]`` is fake-quantized as ``[out, in]`` (NVFP4 blocks
  along the input features, per-channel FP8 per output feature) with amax ``max|W|`` of the
  current params (stop-gradient), i.e. the max calibration of the weight at every step;
* activations: ``dot_general(path)`` quantizes the left operand of the injected contraction with
  a dynamic amax (``max|x|`` of each call) using the recipe's ``input_quantizer`` config for that
  linear; it returns ``jax.lax.dot_general`` unchanged when the input quantizer is disabled;
* gradients: ModelOpt's straight-through estimator (``jaxquant.qat.ste``) for both;
* not covered: static (calibrated) or learnable activation amax, attention/KV quantizers,
  kernels of more than two dimensions (``DenseGeneral`` with several feature axes), and
  ``export_hf`` (which needs jaxquant's NNX decoders).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxquant.errors import UnsupportedError
from jaxquant.qat.quantizer import QATQuantizer
from jaxquant.recipe.matcher import Resolution, resolve_pytree


def _path_name(path) -> tuple[str, str]:
    """``(module name, leaf name)`` of a params leaf path, like ``sites_from_pytree``."""
    comps = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    while comps and comps[-1] in ("value", "raw_value"):
        comps.pop()
    if comps and comps[0] == "params":
        comps = comps[1:]
    return ".".join(comps[:-1]), comps[-1] if comps else ""


def _dynamic_quantizer(cfg, shape=None) -> QATQuantizer:
    q = QATQuantizer(amax_mode="dynamic")
    q.configure(cfg, tensor_shape=shape)
    q.set_mode("fake_quant")
    return q


class LinenQAT:
    """A recipe resolved on a Linen params pytree (module doc).

    Args:
      recipe: a recipe name / path, ``Recipe`` or ModelOpt-style dict.
      params: the params pytree (``variables["params"]`` or the whole ``variables``).

    Attributes:
      resolution: the recipe's ``Resolution`` on the params' quantizer sites (``report()``).
      weights: ``{linear name: config}`` of the kernels that get fake-quantized.
    """

    def __init__(self, recipe: Any, params: Any):
        self.resolution: Resolution = resolve_pytree(recipe, params)
        self._weight_q: dict[str, QATQuantizer] = {}
        self._input_cfg: dict[str, Any] = {}
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        for path, leaf in flat:
            module, leaf_name = _path_name(path)
            cfg = self.resolution.configs.get(f"{module}.weight_quantizer")
            if cfg is None or leaf_name not in ("kernel", "weight"):
                continue
            shape = tuple(leaf.shape)
            if len(shape) != 2:
                raise UnsupportedError(f"{module}.{leaf_name}: LinenQAT quantizes 2-D kernels only, got shape {shape}")
            self._check(cfg, f"{module}.weight_quantizer")
            self._weight_q[module] = _dynamic_quantizer(cfg, (shape[1], shape[0]))
        for name, cfg in self.resolution.configs.items():
            if name.endswith(".input_quantizer") and cfg is not None:
                self._check(cfg, name)
                self._input_cfg[name[: -len(".input_quantizer")]] = cfg

    @staticmethod
    def _check(cfg, name):
        if isinstance(cfg, tuple) or cfg.unsupported_reason is not None:
            reason = "a sequential quantizer" if isinstance(cfg, tuple) else cfg.unsupported_reason
            raise UnsupportedError(f"{name}: {reason} is not supported")

    @property
    def weights(self) -> dict[str, Any]:
        return {m: q.config for m, q in self._weight_q.items()}

    def fake_quant_params(self, params: Any) -> Any:
        """``params`` with every matched kernel fake-quantized (call it inside the loss)."""

        def one(path, leaf):
            module, leaf_name = _path_name(path)
            q = self._weight_q.get(module)
            if q is None or leaf_name not in ("kernel", "weight"):
                return leaf
            return q(leaf.T).T

        return jax.tree_util.tree_map_with_path(one, params)

    def dot_general(self, module: str) -> Callable:
        """A ``dot_general`` for ``nn.Dense(dot_general=...)`` of the linear named ``module``:
        the lhs (activations) is fake-quantized with the recipe's input config, per call."""
        cfg = self._input_cfg.get(module)
        if cfg is None:
            return jax.lax.dot_general
        q = _dynamic_quantizer(cfg)

        def quantized_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                                  **kwargs):
            return jax.lax.dot_general(q(lhs), rhs, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type, **kwargs)

        return quantized_dot_general


__all__ = ["LinenQAT"]
