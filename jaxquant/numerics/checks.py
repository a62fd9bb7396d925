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


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def nonfinite_params(model) -> list[str]:
    """Dotted NNX paths of the model's floating-point parameters that hold NaN or Inf (model order).

    Uses ``isfinite`` on every element: a ``max``-based test is not enough because XLA:CPU's max can drop NaN.
    One small jitted reduction per tensor, run where the tensor lives (compiled once per shape and dtype, so a
    deep model compiles a handful of them, not one program as large as the model), all read back together.
    """
    from flax import nnx

    from jaxquant.models.walk import iter_variables

    flat = [(".".join(str(k) for k in path), v.get_value() if hasattr(v, "get_value") else v.value)
            for path, v in iter_variables(model, nnx.Param)]
    flat = [(p, a) for p, a in flat if jnp.issubdtype(a.dtype, jnp.inexact)]
    from jaxquant.mesh import settle

    ok = jax.device_get([settle(_all_finite(a)) for _, a in flat])  # settle: one at a time over a CPU mesh
    return [p for (p, _), good in zip(flat, ok) if not bool(good)]


def host_all_finite(arr: np.ndarray) -> bool:
    """Whether a host array of an IEEE float dtype (float16/32/64, bfloat16) holds no NaN or Inf, read from its bits.

    A value is non-finite when its exponent bits are all ones. Read as signed integers, the positive ones are those
    at least +Inf's bits; read as unsigned integers, the negative ones are those at least -Inf's bits (sign bit set,
    exponent all ones). So two integer max reductions over the array decide it: no temporary array, and numpy
    releases the GIL for each, so the loader's threads check every tensor as they read it with no device program
    to compile. Other dtypes always pass."""
    a = np.asarray(arr)
    if a.dtype.kind not in "fV" or a.dtype.itemsize not in (2, 4, 8) or a.size == 0:
        return True
    try:
        inf_bits = int(np.array(np.inf, a.dtype).view(f"u{a.dtype.itemsize}"))
    except (TypeError, ValueError, OverflowError):  # pragma: no cover - a float type without an Inf
        return True
    bits = np.ascontiguousarray(a).reshape(-1)
    sign = 1 << (8 * a.dtype.itemsize - 1)
    if int(bits.view(f"i{a.dtype.itemsize}").max()) >= inf_bits:
        return False
    return int(bits.view(f"u{a.dtype.itemsize}").max()) < (sign | inf_bits)


def check_params_finite(model, *, name_map=None, source: str = "the model") -> None:
    """``NonFiniteError`` naming the first parameters that hold NaN/Inf (HF names when ``name_map``
    is given). Run once after loading, before any forward: a NaN anywhere (a norm weight included)
    makes every calibration statistic and perplexity meaningless."""
    bad = nonfinite_params(model)
    if bad:
        names = [name_map.hf_name(p) if name_map is not None else p for p in bad]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise NonFiniteError(f"{source}: the parameters {shown} hold NaN or Inf; every forward pass would be NaN. "
                             "The checkpoint is corrupt or was converted to a dtype that overflows.")
