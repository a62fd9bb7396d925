"""The pieces of ModelOpt's ``local_hessian`` calibration that do not need a forward pass: the per-block input
statistic and the Hessian-weighted error of the weight search (``mse.search_amax(..., metric=H)``).

ModelOpt's ``local_hessian_calibrate`` (``LocalHessianCalibConfig``: the ``mse`` fields with ``fp8_scale_sweep``
true by default, ``block_size`` 16, ``debug``) runs ``max``, then a second forward pass with every weight quantizer
disabled (input quantizers fake-quantizing as calibrated), in which each linear's input ``X`` (the tensor before its
input quantizer) is accumulated per block of ``block_size`` input columns: ``H_b = sum_tokens X_b^T X_b`` (float32,
``[in / bs, bs, bs]``), divided by the number of tokens at the end. The weight search is then the ``mse`` search
with the error of a candidate, per output row ``c`` and block ``b``, ``dw_cb^T H_b dw_cb`` (``dw = w - QDQ(w)``)
instead of ``sum dw^2``; a weight whose input width is not a multiple of ``block_size`` falls back to the squared
error.

Not wired as an algorithm yet: collecting ``H`` needs a per-site statistic in the calibration forward (the stage
executables thread only ``QuantAmax`` state today). ``block_hessian`` is that statistic for one batch, ``hessian_error``
the metric; both are tested against ModelOpt's own ``_LocalHessianAccumulator`` and ``NVFP4MSECalibrator``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_hessian(x: jax.Array, block_size: int = 16, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(sum over tokens of X_b^T X_b [in / bs, bs, bs] float32, number of tokens)`` of one batch of a linear's
    input ``x [..., in]`` (``token_mask [...]``: positions that count; padding contributes nothing).

    Raises:
      ValueError: ``in`` not a multiple of ``block_size`` (ModelOpt falls back to the squared error there).
    """
    k = x.shape[-1]
    if k % block_size:
        raise ValueError(f"input width {k} is not a multiple of the Hessian block size {block_size}")
    xs = x.reshape(-1, k).astype(jnp.float32)
    if token_mask is None:
        n = jnp.asarray(xs.shape[0], jnp.int32)
    else:
        m = token_mask.reshape(-1).astype(bool)
        xs = jnp.where(m[:, None], xs, 0.0)
        n = jnp.sum(m, dtype=jnp.int32)
    xb = xs.reshape(xs.shape[0], k // block_size, block_size)
    h = jnp.einsum("tnb,tnd->nbd", xb, xb, precision=jax.lax.Precision.HIGHEST)
    return h, n


def hessian_error(d: jax.Array, hessian: jax.Array) -> jax.Array:
    """The local-Hessian error of a weight difference ``d [..., out, in]``: per output row and block of ``bs``
    columns ``d_b^T H_b d_b`` (``hessian [..., in / bs, bs, bs]``, already divided by the token count), repeated on
    the block's ``bs`` elements (as ModelOpt's ``local_hessian_error`` returns it), so summing over a block gives
    ``bs`` times the block's error."""
    *lead, out, k = d.shape
    n, bs = hessian.shape[-3], hessian.shape[-1]
    db = d.astype(jnp.float32).reshape(*lead, out, n, bs)
    hd = jnp.einsum("...nbd,...cnd->...cnb", hessian.astype(jnp.float32), db, precision=jax.lax.Precision.HIGHEST)
    loss = jnp.sum(db * hd, axis=-1)
    return jnp.broadcast_to(loss[..., None], (*lead, out, n, bs)).reshape(d.shape)


__all__ = ["block_hessian", "hessian_error"]
