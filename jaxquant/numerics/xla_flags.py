"""The ``XLA_FLAGS`` entry for exact float32 division on NVIDIA GPUs and the device-memory default, without importing
JAX.

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


#: Share of an accelerator's memory JAX's allocator takes when the user has not chosen (JAX's own default is 0.75).
DEVICE_MEMORY_FRACTION = "0.90"
_ALLOCATOR_SETTINGS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def with_device_memory_default(environ: dict) -> dict:
    """``environ`` (a copy) with ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = :data:`DEVICE_MEMORY_FRACTION` unless one of
    JAX's allocator settings is already there (the user's choice is kept).

    JAX preallocates 75 % of a GPU by default and leaves the rest to other processes; the ``jaxquant`` command is the
    only user of its device, and GPTQ over a whole 8B model holds every linear's Hessian (~39 GB in float32 for
    Llama-3.1-8B) beside the 16 GB of bf16 weights: 75 % of an 80 GB H100 (59.6 GB) ran out of memory, 90 % leaves
    ~72 GB. Must be set before JAX starts a backend."""
    out = dict(environ)
    if not any(k in out for k in _ALLOCATOR_SETTINGS):
        out["XLA_PYTHON_CLIENT_MEM_FRACTION"] = DEVICE_MEMORY_FRACTION
    return out


__all__ = ["DEVICE_MEMORY_FRACTION", "IEEE_GPU_DIVISION_FLAG", "with_device_memory_default", "with_ieee_gpu_division"]
