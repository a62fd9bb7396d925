"""A synthetic checkpoint: a config plus a seed, for benchmarks of models larger than the disk.

``load_synthetic(hf_config, seed=0)`` builds the model exactly as ``load_hf`` does (``plan_load`` + ``load_params``: the same
threads, dtype casts, finite checks and device copies) from a ``SyntheticSource`` that generates each tensor when
the loader asks for it instead of reading it from safetensors files: weights (``ndim >= 2``) are normal with
standard deviation 0.02, vectors (norm weights, biases) 1 + 0.02 * normal. The full-depth Gemma-4-31B shape (62 GB
in bf16) then runs on a machine whose disk could not hold it (``benchmarks/bench_synthetic.py``).

Drawing 30 billion normal numbers takes minutes (numpy draws about 200 million a second), longer than the job it
feeds, so the source draws one pool of ``POOL`` normal numbers per seed and cuts every tensor out of it as a copy:
tensor ``name`` is the pool read cyclically from offset ``crc32(name) mod POOL``. The values are the same whatever
the load order or thread count, and a copy runs at memory speed. ``POOL`` is a prime, so the rows of a matrix do
not repeat each other; the values do repeat every ``POOL`` elements (a benchmark input, not a model).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.converters.names import NameMap, dotted
from jaxquant.models.config import ModelConfig
from jaxquant.models.decoder import abstract_model

#: Standard deviation of the generated weights (transformers' default ``initializer_range``).
STD = 0.02
#: Length of the pool of normal numbers every tensor is cut from (a prime a little above 2**24: 64 MiB in float32).
POOL = 16_777_259

_pools: dict[int, np.ndarray] = {}
_pools_lock = threading.Lock()


def _pool(seed: int) -> np.ndarray:
    """The seed's pool: ``POOL`` float32 normal numbers times ``STD`` (drawn once per process and seed)."""
    with _pools_lock:
        pool = _pools.get(seed)
        if pool is None:
            pool = np.random.default_rng(seed).standard_normal(POOL, dtype=np.float32)
            pool *= STD
            _pools[seed] = pool
        return pool


class SyntheticSource:
    """The ``TensorSource`` of a synthetic checkpoint: every tensor the model needs, generated on ``get``."""

    def __init__(self, config: ModelConfig, name_map: NameMap, *, seed: int = 0):
        _, state = nnx.split(abstract_model(config, dtype=jnp.float32))
        self.shapes = {name_map.hf_name(dotted(p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}
        self.seed = int(seed)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> str:
        return "F32"

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 (``materialize`` casts it to the load dtype)."""
        pool = _pool(self.seed)
        shape = self.shapes[name]
        n = int(np.prod(shape, dtype=np.int64))
        x = np.empty(n, np.float32)
        done, start = 0, zlib.crc32(name.encode()) % POOL
        while done < n:  # the pool read cyclically: one copy per wrap
            k = min(n - done, POOL - start)
            x[done:done + k] = pool[start:start + k]
            done, start = done + k, 0
        if len(shape) < 2:
            x += 1.0
        return x.reshape(shape)

    def where(self, name: str) -> str:
        return f"synthetic checkpoint (seed {self.seed})"


def open_synthetic(hf_config: Mapping[str, Any], dtype=jnp.bfloat16, *, seed: int = 0):
    """``(LoadedModel, SyntheticSource)``: the model of ``hf_config`` with ``ShapeDtypeStruct`` parameters (no
    memory) and the source that generates them, for the streamed ``--layerwise`` path (``converters.hf.open_hf``'s
    counterpart; nothing is generated until a tensor is read)."""
    from jaxquant.converters.hf import LoadedModel, resolve_dtype

    dtype = resolve_dtype(dtype)
    config = ModelConfig.from_hf_config(dict(hf_config), source="synthetic config")
    nm = NameMap.for_config(config)
    model = abstract_model(config, dtype=dtype)
    return LoadedModel(model, config, {}, dict(hf_config), None, nm), SyntheticSource(config, nm, seed=seed)


def load_synthetic(hf_config: Mapping[str, Any], dtype=jnp.bfloat16, *, seed: int = 0, sharding=None):
    """A ``LoadedModel`` of the architecture and shape in ``hf_config`` (a ``config.json`` dict) with synthetic
    weights (module doc); no tokenizer and no source directory. ``dtype`` and ``sharding`` as in ``load_hf``."""
    from jaxquant.converters.hf import LOAD_WORKERS, load_params, plan_load, resolve_dtype

    dtype = resolve_dtype(dtype)
    loaded, source = open_synthetic(hf_config, dtype, seed=seed)
    plan = plan_load(loaded.config, source, nnx.state(loaded.model), dtype=dtype, name_map=loaded.name_map,
                     sharding=sharding)
    load_params(plan, source, dtype=dtype, workers=LOAD_WORKERS)  # get() is thread-safe: one generator per tensor
    return loaded


__all__ = ["POOL", "STD", "SyntheticSource", "load_synthetic", "open_synthetic"]
