"""A reference QAT train step for Flax NNX: optax through ``nnx.Optimizer``, gradient accumulation, remat.

    optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)
    step = make_train_step(microbatches=4, remat=True)
    loss = step(model, optimizer, input_ids, attention_mask)      # one optimizer update

Nothing here is specific to quantization, which is the point: a fake-quantized model trains
with ordinary code. Quantizer state survives because of where it lives, not because of this step:

* static amax is a ``QuantAmax`` variable, not an ``nnx.Param``: it is never differentiated, never
  touched by the optimizer, and never written by the forward pass (``fake_quant`` mode only reads
  it), so neither accumulation (several forward/backward passes, one update) nor remat
  (``jax.checkpoint`` recomputing the forward) can drop or overwrite it;
* a learnable amax (``LearnableAmax``, in ``wrt``) is a parameter like the weights: its gradients
  are summed over microbatches with theirs and it is updated once per step;
* a dynamic amax is recomputed from the tensor in every (re)computed forward pass and is not state.

The failure mode of delayed-scaling FP8 stacks (amax history carried as "overwrite with gradient"
leaves, replaced instead of max-reduced across microbatches, marin#7659) cannot occur: no
quantizer state is carried through gradients. ``tests/qat/test_train.py`` checks all three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def lm_loss(model: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Next-token loss of a causal LM as ``(summed NLL, scored tokens)`` (float32, int32).

    Uses the model's chunked ``nll`` when it has one (jaxquant decoders), else its logits.
    """
    if hasattr(model, "nll"):
        return model.nll(input_ids, attention_mask)
    from jaxquant.eval.perplexity import token_nll

    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    return token_nll(model(input_ids, attention_mask), input_ids, mask)


def loss_and_grads(model: Any, *batch, loss_fn: LossFn = lm_loss, microbatches: int = 1,
                   remat: bool = False, wrt: Any = nnx.Param) -> tuple[jax.Array, Any]:
    """Mean loss over all scored tokens of ``batch`` and its gradient w.r.t. the ``wrt`` state.

    Args:
      batch: arrays with a leading batch axis (``input_ids, attention_mask``), split into
        ``microbatches`` equal parts along it; each part is a forward/backward pass, gradients of
        the summed loss are added up and divided by the total token count once, so the result
        equals the full batch's (up to float summation order).
      loss_fn: ``loss_fn(model, *microbatch) -> (summed loss, count)``.
      remat: recompute the forward pass during the backward pass (``jax.checkpoint``) instead of
        keeping its activations.
      wrt: the variables to differentiate (an NNX filter), as given to ``nnx.Optimizer``.

    Returns:
      ``(loss, grads)`` with ``grads`` an ``nnx.State`` shaped like ``nnx.state(model, wrt)``.
    """
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def summed(p, *b):
        # copy=True: fresh variables owned by this trace, so a model that runs its layers under
        # nnx.remat (which writes state back) works inside jax.grad / lax.scan
        return loss_fn(nnx.merge(graphdef, p, rest, copy=True), *b)

    if remat:
        summed = jax.checkpoint(summed)
    grad_fn = jax.value_and_grad(summed, has_aux=True)

    if microbatches == 1:
        (total, count), grads = grad_fn(params, *batch)
    else:
        n = batch[0].shape[0]
        if n % microbatches:
            raise ValueError(f"batch of {n} rows does not split into {microbatches} microbatches")
        parts = jax.tree.map(lambda a: a.reshape(microbatches, n // microbatches, *a.shape[1:]), batch)

        def body(carry, b):
            g_acc, s_acc, c_acc = carry
            (s, c), g = grad_fn(params, *b)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, c_acc + c), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, total, count), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), parts)
    scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    return total * scale, grads


def make_train_step(*, loss_fn: LossFn = lm_loss, microbatches: int = 1, remat: bool = False,
                    wrt: Any = nnx.Param) -> Callable:
    """A jitted ``step(model, optimizer, *batch) -> loss``: ``loss_and_grads`` then one
    ``optimizer.update``. ``wrt`` must be the optimizer's ``wrt``."""

    @nnx.jit
    def step(model, optimizer, *batch):
        loss, grads = loss_and_grads(model, *batch, loss_fn=loss_fn, microbatches=microbatches,
                                     remat=remat, wrt=wrt)
        optimizer.update(model, grads)
        return loss

    return step


__all__ = ["loss_and_grads", "lm_loss", "make_train_step"]
