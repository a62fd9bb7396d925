"""Sharded safetensors writing, laid out as transformers' ``save_pretrained`` does.

* ``max_shard_size``: an int (bytes) or a string with a decimal unit, ``"10GB"`` = 10**10 bytes
  (``TB``/``GB``/``MB``/``KB``, as huggingface_hub parses it). ModelOpt's export default is "10GB".
* Tensors are assigned to shards in the given order, greedily: a tensor that would push the
  current shard past the limit starts a new one; a tensor larger than the limit gets a shard of its
  own (huggingface_hub ``split_state_dict_into_shards_factory``).
* One shard -> ``model.safetensors``; several -> ``model-00001-of-0000N.safetensors`` plus
  ``model.safetensors.index.json`` ``{"metadata": {"total_parameters", "total_size"},
  "weight_map": {...}}`` (``json.dumps(indent=2, sort_keys=True)`` and a newline).
* Every file carries ``__metadata__ = {"format": "pt"}``, which transformers requires to load it.

Tensors are produced lazily (one shard in memory at a time): each entry gives its shape and dtype
up front, plus a callable returning the array.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxquant.errors import ExportError
from jaxquant.io.safetensors import TAGS, save_file

_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}


def parse_size(size: int | str) -> int:
    """Bytes in ``size`` (an int, or "10GB" / "500MB" / "1.5GB": decimal units like huggingface_hub)."""
    if isinstance(size, int):
        if size <= 0:
            raise ExportError(f"max_shard_size must be positive, got {size}")
        return size
    s = str(size).strip()
    unit = s[-2:].upper()
    if unit not in _UNITS:
        raise ExportError(f"max_shard_size {size!r}: unit must be one of TB, GB, MB, KB (e.g. '10GB').")
    try:
        value = float(s[:-2].strip())
    except ValueError:
        raise ExportError(f"max_shard_size {size!r}: cannot parse the number.") from None
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ExportError(f"max_shard_size must be positive, got {size!r}")
    return n


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, shape, numpy dtype and a callable producing the array."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(entries: Sequence[Entry], max_shard_size: int | str) -> list[list[Entry]]:
    """Greedy in-order split (huggingface_hub's rule)."""
    limit = parse_size(max_shard_size)
    shards: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for e in entries:
        n = e.nbytes
        if n > limit:
            shards.append([e])
            continue
        if size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    if current:
        shards.append(current)
    return shards


def shard_filenames(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_sharded(
    entries: Sequence[Entry],
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "10GB",
    total_parameters: int | None = None,
    on_shard: Callable[[str, int], None] | None = None,
) -> list[str]:
    """Write ``entries`` as one or more safetensors files (+ index) into ``directory``.

    Each produced array must match its entry's shape and dtype (checked: a mismatch is a bug in
    the producer, reported with the tensor name). Returns the shard file names.
    """
    d = Path(directory)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ExportError(f"duplicate tensor names in the export: {dup[:5]}")
    for e in entries:
        if np.dtype(e.dtype) not in TAGS:
            raise ExportError(f"tensor {e.name!r}: dtype {e.dtype} cannot be stored in safetensors")
    shards = plan_shards(entries, max_shard_size) or [[]]
    files = shard_filenames(len(shards))
    weight_map: dict[str, str] = {}
    for fname, shard in zip(files, shards, strict=True):
        arrays = {}
        for e in shard:
            a = e.produce()
            if tuple(a.shape) != tuple(e.shape) or a.dtype != np.dtype(e.dtype):
                raise ExportError(
                    f"internal error: tensor {e.name!r} was planned as {e.shape} {np.dtype(e.dtype)} "
                    f"but produced {tuple(a.shape)} {a.dtype}"
                )
            arrays[e.name] = a
            weight_map[e.name] = fname
        save_file(arrays, d / fname, metadata=SAFETENSORS_METADATA)
        del arrays
        if on_shard is not None:
            on_shard(fname, sum(e.nbytes for e in shard))
    if len(files) > 1:
        meta: dict[str, int] = {}
        if total_parameters is not None:
            meta["total_parameters"] = int(total_parameters)
        meta["total_size"] = sum(e.nbytes for e in entries)
        index = {"metadata": meta, "weight_map": weight_map}
        (d / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files
