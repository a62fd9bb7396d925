"""IEEE-exact float32 division under XLA.

ModelOpt's references divide exactly (IEEE, round to nearest even) in the order the code is
written. XLA does not always keep ``a / b`` as a correctly rounded division:

* its algebraic simplifier rewrites ``A / const`` into ``A * (1/const)``, ``(A / B) / C`` into
  ``A / (B * C)`` and ``A / (B / C)`` into ``(A * C) / B``;
* its CPU backend computes a division by a broadcast divisor (a scalar, or a per-row/per-block
  value) as a multiplication by the divisor's reciprocal.

Each of these changes the last bit of some quotients. :func:`div` keeps the division exact with two
selects that do not change any result but hide the patterns: the divisor becomes
``where(isnan(a), 1, b)`` (a NaN dividend gives NaN whatever the divisor) and the dividend
``where(isnan(b), nan, a)``. Neither is a constant, a broadcast or a quotient any more, so XLA
emits a plain elementwise divide. The selects are elementwise and fuse; they cost no memory traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def opaque(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but invisible to XLA's algebraic simplifier (use on small arrays only)."""
    return lax.optimization_barrier(x)


def div(a, b) -> jax.Array:
    """IEEE float32 ``a / b`` exactly as written (no reciprocal or reassociation rewrites)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    dividend = jnp.where(jnp.isnan(b), jnp.float32(jnp.nan), a)
    divisor = jnp.where(jnp.isnan(a), jnp.float32(1.0), b)
    return dividend / divisor
