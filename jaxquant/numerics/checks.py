"""Host-side checks run before calibration or export (never inside a jitted kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import NonFiniteError


@jax.jit
def _nonfinite_counts(x):
    x = jnp.asarray(x)
    return jnp.sum(jnp.isnan(x)), jnp.sum(jnp.isinf(x))


def assert_finite(x, name: str) -> None:
    """Raise :class:`~jaxquant.errors.NonFiniteError` naming ``name`` if ``x`` holds NaN or Inf.

    Syncs with the device (it reads two counts back): call it once per tensor before quantizing
    or exporting, not in a hot loop. Integer and bool arrays always pass.
    """
    dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    if not jnp.issubdtype(dtype, jnp.inexact):
        return
    n_nan, n_inf = (int(v) for v in _nonfinite_counts(x))
    if n_nan or n_inf:
        shape = tuple(getattr(x, "shape", np.shape(x)))
        raise NonFiniteError(
            f"tensor {name!r} (shape {shape}, {dtype}) holds {n_nan} NaN and {n_inf} Inf values; "
            "quantizing it would write NaN or saturated scales. Fix the model or data that produced "
            "it (check the checkpoint, the calibration data, or a diverged training step)."
        )
