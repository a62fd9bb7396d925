"""IEEE-exact building blocks shared by the FP8 and NVFP4 kernels.

XLA's algebraic simplifier rewrites divisions in ways that change float bits:
``A / const`` becomes ``A * (1/const)``, ``A / (B / C)`` becomes ``(A * C) / B`` and
``(A / B) / C`` becomes ``A / (B * C)``. ModelOpt's reference divides exactly (IEEE, round to
nearest even) in the order it is written, so a bit-exact port must keep XLA from seeing those
patterns. :func:`div` hides its operands behind ``lax.optimization_barrier``, which the simplifier
cannot look through. Only use it where the operands are small (scalars, per-channel or per-block
scales): a barrier on a large tensor forces it to be materialized and costs memory bandwidth. A
division whose dividend is a large tensor and whose divisor is neither a constant nor a quotient
(``|x| / block_scale``) is left as a plain ``/``.
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
    return opaque(opaque(a) / opaque(b))
