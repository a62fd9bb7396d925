"""Safetensors read/write without torch, for every dtype ModelOpt checkpoints use.

safetensors' own numpy/flax reader cannot return F8 tensors (safetensors#682), so this module
parses the format itself: an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``), then the raw
little-endian bytes. Reading is memory-mapped and zero-copy: ``get`` returns a read-only numpy
view into the file, typed with ml_dtypes for BF16 / F8.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxquant.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
TAGS: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: header tag, shape and byte range relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse a safetensors header.

    Returns:
      (tensors by name, ``__metadata__`` dict, byte offset where the data section starts).
    Raises:
      CheckpointError naming the file when it is truncated or not a safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes). Re-download it.")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (header length {n}, file size {size}). "
                "Re-download or re-export the file."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}).") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            info = TensorInfo(spec["dtype"], tuple(int(d) for d in spec["shape"]), *map(int, spec["data_offsets"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}.") from None
        if data_start + info.end > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + info.end} but the "
                f"file has {size} bytes. Re-download or re-export the checkpoint."
            )
        tensors[name] = info
    return tensors, metadata, data_start


class SafetensorsFile:
    """A lazily read, memory-mapped safetensors file.

    ``get(name)`` returns a read-only numpy array viewing the mapped file (no copy).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found.")
        self.tensors, self.metadata, self._data_start = read_header(self.path)
        self._mmap: mmap.mmap | None = None
        self._lock = threading.Lock()  # get() is called from several loader threads

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def tensor_info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def _buffer(self) -> mmap.mmap:
        with self._lock:
            if self._mmap is None:
                with open(self.path, "rb") as f:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._mmap

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only numpy array (zero-copy view of the file)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found.")
        info = self.tensors[name]
        if info.dtype not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {info.dtype}, which jaxquant cannot load "
                f"(supported: {', '.join(DTYPES)})."
            )
        dtype = DTYPES[info.dtype]
        count = int(np.prod(info.shape, dtype=np.int64))
        if (info.end - info.begin) != count * dtype.itemsize:
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: byte range {info.end - info.begin} does not match "
                f"shape {info.shape} x {info.dtype}."
            )
        arr = np.frombuffer(self._buffer(), dtype=dtype, count=count, offset=self._data_start + info.begin)
        return arr.reshape(info.shape)

    def close(self):
        # Views returned by get() keep the mapping alive; closing is best effort.
        self._mmap = None


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """Write ``tensors`` (numpy arrays or anything ``np.asarray`` accepts, incl. jax arrays) to ``path``.

    Tensors are written in sorted-name order, 8-byte aligned like the reference implementation.
    Supports every dtype in ``DTYPES`` (F8_E4M3 / F8_E8M0 via ml_dtypes).
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # np.ascontiguousarray would turn 0-d scalars into shape (1,)
        tag = TAGS.get(a.dtype)
        if tag is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        nbytes = a.nbytes
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        arrays.append(a)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)  # zero-copy


def save_file_atomic(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """``save_file`` into a temporary file beside ``path``, fsynced, then renamed over it: ``path`` is either its old
    contents or the complete new file, never a partial one (also after Ctrl-C). The file gets ``0o666 & ~umask``.
    Raises ``OSError`` (nothing left behind) or what interrupted it."""
    import tempfile

    from jaxquant.interrupt import raise_if_interrupted

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0o600 would hide the file from other users
        save_file(tensors, tmp, metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        raise_if_interrupted()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclasses.dataclass
class CheckpointFiles:
    """The safetensors files of an HF checkpoint directory, single-file or sharded.

    ``name_to_file`` maps every tensor name to its open ``SafetensorsFile``.
    """

    directory: Path
    files: dict[str, SafetensorsFile]
    name_to_file: dict[str, SafetensorsFile]

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "CheckpointFiles":
        """Open ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.

        Raises CheckpointError naming the missing / truncated shard or the tensor the index
        promises but no shard holds.
        """
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        single = d / "model.safetensors"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e}).") from None
            files = {}
            for shard in sorted(set(weight_map.values())):
                p = d / shard
                if not p.is_file():
                    raise CheckpointError(
                        f"{index} lists shard {shard!r}, which is missing from {d}. Download every shard."
                    )
                files[shard] = SafetensorsFile(p)
            name_to_file = {}
            for name, shard in weight_map.items():
                if name not in files[shard]:
                    raise CheckpointError(f"{d / shard}: tensor {name!r} is listed in the index but missing.")
                name_to_file[name] = files[shard]
        elif single.is_file():
            f = SafetensorsFile(single)
            files = {single.name: f}
            name_to_file = {k: f for k in f.keys()}
        else:
            found = sorted(p.name for p in d.glob("*.safetensors"))
            if len(found) == 0:
                raise CheckpointError(
                    f"{d}: no model.safetensors or model.safetensors.index.json found. "
                    "jaxquant loads Hugging Face safetensors checkpoints (or a .gguf file)."
                )
            files = {n: SafetensorsFile(d / n) for n in found}
            name_to_file = {k: f for f in files.values() for k in f.keys()}
        return cls(d, files, name_to_file)

    def keys(self) -> list[str]:
        return list(self.name_to_file)

    def __contains__(self, name: str) -> bool:
        return name in self.name_to_file

    def __iter__(self) -> Iterator[str]:
        return iter(self.name_to_file)

    def get(self, name: str) -> np.ndarray:
        if name not in self.name_to_file:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found in the checkpoint.")
        return self.name_to_file[name].get(name)

    def tensor_info(self, name: str) -> TensorInfo:
        return self.name_to_file[name].tensor_info(name)
