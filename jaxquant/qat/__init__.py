"""Quantization-aware training (QAT) in your own Flax training loop. See docs/qat.md.

* ``prepare_qat(model, recipe, data)``: PTQ (``quantize``) plus training quantizers
  (``QATQuantizer``: ModelOpt's straight-through gradients, static / dynamic / learnable amax);
  a user's ``nnx.Linear`` layers get ModelOpt-named quantizer sites (``attach_quantizers``).
* ``finish_qat(model)``: freeze and finalize the amax so the model computes what ``export_hf`` writes.
* ``make_train_step`` / ``loss_and_grads``: a reference step with ``nnx.Optimizer``, gradient
  accumulation and remat.
* ``LinenQAT``: the same recipes on a Linen model's params (weights) and ``dot_general`` (activations).
* ``fake_quant`` (``ste.py``): the differentiable fake quantization all of them use.
"""

from jaxquant.qat.linen import LinenQAT
from jaxquant.qat.nnx_linear import QuantizedLinear, attach_quantizers
from jaxquant.qat.prepare import finish_qat, prepare_qat
from jaxquant.qat.quantizer import LearnableAmax, QATQuantizer
from jaxquant.qat.ste import amax_per_element, fake_quant
from jaxquant.qat.train import lm_loss, loss_and_grads, make_train_step

__all__ = [
    "LearnableAmax",
    "LinenQAT",
    "QATQuantizer",
    "QuantizedLinear",
    "amax_per_element",
    "attach_quantizers",
    "fake_quant",
    "finish_qat",
    "lm_loss",
    "loss_and_grads",
    "make_train_step",
    "prepare_qat",
]
