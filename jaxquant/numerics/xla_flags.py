"""The ``XLA_FLAGS`` entry for exact float32 division on NVIDIA GPUs, without importing JAX.

``XLA_FLAGS`` must be set before JAX starts a backend, and the ``jaxquant`` command sets it before anything heavy is
imported (the tokenizer's child process starts first), so this module imports nothing but the standard library.
The numerics are exact with or without the flag (``jaxquant.numerics._exact``); it only makes them faster on GPUs.
"""

from __future__ import annotations

IEEE_GPU_DIVISION_FLAG = "--xla_backend_extra_options=-nvptx-prec-divf32=2"
"""``XLA_FLAGS`` entry that makes XLA's NVIDIA GPU backend divide float32 with IEEE ``div.rn``."""


def with_ieee_gpu_division(xla_flags: str) -> str:
    """``xla_flags`` (an ``XLA_FLAGS`` value) with :data:`IEEE_GPU_DIVISION_FLAG` added.

    Merges into an existing ``--xla_backend_extra_options=...`` (a comma-separated list) instead of
    adding a second one; returns the value unchanged if it already asks for IEEE division (or for
    another ``-nvptx-prec-divf32`` level, which is the user's choice).
    """
    if "-nvptx-prec-divf32=" in xla_flags:
        return xla_flags
    option = IEEE_GPU_DIVISION_FLAG.split("=", 1)[1]
    parts = xla_flags.split()
    for i, part in enumerate(parts):
        if part.startswith("--xla_backend_extra_options="):
            parts[i] = f"{part},{option}" if not part.endswith("=") else part + option
            return " ".join(parts)
    return " ".join(parts + [IEEE_GPU_DIVISION_FLAG])


__all__ = ["IEEE_GPU_DIVISION_FLAG", "with_ieee_gpu_division"]
