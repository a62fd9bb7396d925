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

Tensors are produced lazily and streamed: each entry gives its shape and dtype up front, plus a
callable returning the array (numpy, or a ``jax.Array`` still being computed on an accelerator).
Because every shape and dtype is known before anything is produced, each file's header and every
tensor's byte offset are fixed up front. ``write_sharded`` then calls ``produce()`` in entry order
on the caller's thread (for JAX that only enqueues device work and returns at once) and hands each
result to a small pool of writer threads, which copy it to host and ``os.pwrite`` its bytes at its
offset, while the next tensors are being computed. At most ``max_inflight_bytes`` of produced but
not yet written tensors (or ``min_inflight_tensors`` tensors, whichever admits more) are alive at
any time, so host memory never holds a second copy of the model. The bytes are identical to a
plain one-tensor-at-a-time write (within a file, tensors sorted by name, 8-byte padded JSON header).

Each written tensor's pages are handed to the disk at once (Linux ``sync_file_range(WRITE)``, which only
starts the write-back): left alone, the kernel holds gigabytes of dirty pages until the final ``fsync``
of the atomic publish, which then waits for all of them (3 s of a 10 s export of 6.6 GB on an H200 host),
whereas started early the disk works while the rest is computed and the ``fsync`` finds little to do.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import ctypes
import ctypes.util
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.errors import ExportError
from jaxquant.io.safetensors import TAGS

log = logging.getLogger(__name__)

_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}
DEFAULT_WORKERS = 4
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 10**6  # more was slower on an H200 host: benchmarks/results/README.md
DEFAULT_MIN_INFLIGHT_TENSORS = 4
_CHUNK = 256 * 2**20  # one pwrite call at most (Linux writes at most ~2 GiB per call anyway)
_THREAD_PREFIX = "jaxquant-export-writer"


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
    produce: Callable[[], Any]  # -> np.ndarray or jax.Array of exactly ``shape`` / ``dtype``
    #: its bytes depend on activation statistics (input / KV scales): an export started before the calibration
    #: forward ends writes it last (``write_sharded``'s ``late``)
    late: bool = False
    #: the calibration statistics its bytes depend on besides the weights (weight amax, block amax), compared
    #: by ``same_inputs`` to find tensors an early export must write again
    inputs: tuple = ()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def same_inputs(a: Entry, b: Entry) -> bool:
    """Whether two plans of one tensor read the same statistics (``Entry.inputs``, arrays compared exactly)."""
    if len(a.inputs) != len(b.inputs):
        return False
    for x, y in zip(a.inputs, b.inputs, strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


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


def shard_layout(shard: Sequence[Entry], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int], int]:
    """Header bytes of one safetensors file, each tensor's absolute byte offset, and the file size.

    Same bytes as ``jaxquant.io.safetensors.save_file``: ``__metadata__`` first, then the tensors
    sorted by name with back-to-back ``data_offsets``; compact JSON padded with spaces so that the
    data section starts 8-byte aligned.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    rel: dict[str, int] = {}
    offset = 0
    for e in sorted(shard, key=lambda e: e.name):
        n = e.nbytes
        header[e.name] = {"dtype": TAGS[np.dtype(e.dtype)], "shape": [int(d) for d in e.shape],
                          "data_offsets": [offset, offset + n]}
        rel[e.name] = offset
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)
    blob = struct.pack("<Q", len(blob)) + blob
    return blob, {k: len(blob) + v for k, v in rel.items()}, len(blob) + offset


def _pwrite_all(fd: int, buf: memoryview, offset: int, stop: threading.Event) -> None:
    pos = 0
    while pos < len(buf):
        if stop.is_set():
            return
        pos += os.pwrite(fd, buf[pos:pos + _CHUNK], offset + pos)


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-back of the range's dirty pages, do not wait


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now (Linux; elsewhere, or
    on a file system that refuses, nothing happens: durability still comes from the publish's ``fsync``)."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # best effort: errors surface at fsync


def _write_tensor(fd: int, offset: int, arr: Any, stop: threading.Event) -> None:
    """Worker: copy ``arr`` to host (blocks until a device computation is done), write its bytes and start
    their write-back to disk."""
    if stop.is_set():
        return
    a = np.asarray(arr)
    del arr
    flat = np.ascontiguousarray(a.reshape(-1))  # C order; a copy only for a non-contiguous producer
    del a
    _pwrite_all(fd, memoryview(flat.view(np.uint8)), offset, stop)
    start_writeback(fd, offset, flat.nbytes)


def _start_host_copy(a: Any) -> Any:
    """Dispatch the device->host copy of a ``jax.Array`` now (asynchronous; the worker's ``np.asarray`` waits).

    Where the device has pinned host memory (GPU, TPU) the copy goes there: ``jax.device_put`` to the
    ``pinned_host`` memory kind runs at interconnect speed from XLA's pooled pinned buffers, and
    ``np.asarray`` of the result is a zero-copy view, whereas a plain copy to pageable memory ran at about
    1.1 GB/s per thread on an H200 (benchmarks/results/README.md). Anything else (numpy, the CPU backend,
    a platform without that memory kind) keeps ``copy_to_host_async`` or nothing.
    """
    sharding = getattr(a, "sharding", None)
    if sharding is None or not hasattr(a, "copy_to_host_async"):
        return a
    if len(sharding.device_set) > 1:
        # sharded over a mesh (jaxquant.mesh): gathered here, one tensor at a time, on the thread that launches
        # every device computation, so no program with collectives ever runs concurrently with another one (on
        # the CPU backend two such programs can starve each other of threads)
        return np.asarray(a)
    try:
        devices = list(sharding.device_set)
        if (getattr(sharding, "memory_kind", None) == "device" and devices[0].platform != "cpu"
                and all("pinned_host" in {m.kind for m in d.addressable_memories()} for d in devices)):
            import jax

            return jax.device_put(a, sharding.with_memory_kind("pinned_host"))
    except Exception as e:  # noqa: BLE001 - an optimisation only: fall back to the plain copy
        log.debug("pinned host copy unavailable (%s); using copy_to_host_async", e)
    a.copy_to_host_async()
    return a


def _check_produced(e: Entry, a: Any) -> Any:
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    try:
        dtype = np.dtype(a.dtype)
    except TypeError:
        dtype = a.dtype
    if tuple(a.shape) != tuple(e.shape) or dtype != np.dtype(e.dtype):
        raise ExportError(
            f"internal error: tensor {e.name!r} was planned as {e.shape} {np.dtype(e.dtype)} "
            f"but produced {tuple(a.shape)} {a.dtype}"
        )
    return a


def _progress_bar(total: int, enabled: bool):
    if not enabled or not getattr(sys.stderr, "isatty", lambda: False)():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="writing", file=sys.stderr,
                dynamic_ncols=True, leave=True)


def write_sharded(
    entries: Sequence[Entry],
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "10GB",
    total_parameters: int | None = None,
    on_shard: Callable[[str, int], None] | None = None,
    progress: bool = False,
    workers: int = DEFAULT_WORKERS,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    min_inflight_tensors: int = DEFAULT_MIN_INFLIGHT_TENSORS,
    late: Callable[[], Sequence[Entry]] | None = None,
) -> list[str]:
    """Write ``entries`` as one or more safetensors files (+ index) into ``directory``, streamed.

    ``produce()`` is called once per entry, in order, on the calling thread; the arrays are copied
    to host and written by ``workers`` threads while the next ones are produced. A new entry is
    produced only while fewer than ``min_inflight_tensors`` are produced-but-unwritten or the
    produced-but-unwritten bytes stay within ``max_inflight_bytes``.

    Each produced array must match its entry's shape and dtype (checked as soon as it is produced:
    a mismatch is a bug in the producer, an ExportError naming the tensor). Any error (a producer
    raising, a failed write such as ENOSPC, KeyboardInterrupt) stops the writers — queued writes are
    cancelled, running ones stop at their next chunk, every writer thread has exited and every file
    is closed before it propagates. Partial files are left behind: removing them is the caller's job
    (``export.atomic``). ``on_shard(file name, tensor bytes)`` is called in shard order as each file
    is complete. ``progress`` shows a tqdm bar of bytes written on stderr when it is a terminal.

    ``late`` (an export started before its activation statistics exist, ``export.early``): the entries marked
    ``Entry.late`` are skipped at first; once every other entry is dispatched, ``late()`` is called (it may
    block until the statistics exist) and returns the entries to write now: the final version of every late
    entry, plus any other planned tensor to write again. Each must be planned (same name, shape and dtype),
    so it lands at its planned offset and the files are byte for byte what one pass would have written.
    Returns the shard file names.
    """
    d = Path(directory)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ExportError(f"duplicate tensor names in the export: {dup[:5]}")
    for e in entries:
        if np.dtype(e.dtype) not in TAGS:
            raise ExportError(f"tensor {e.name!r}: dtype {e.dtype} cannot be stored in safetensors")
    if workers < 1 or min_inflight_tensors < 1 or max_inflight_bytes < 0:
        raise ValueError("workers and min_inflight_tensors must be >= 1, max_inflight_bytes >= 0")
    shards = plan_shards(entries, max_shard_size) or [[]]
    files = shard_filenames(len(shards))
    weight_map = {e.name: fname for fname, shard in zip(files, shards, strict=True) for e in shard}
    total = sum(e.nbytes for e in entries)

    stop = threading.Event()
    fds: dict[int, int] = {}
    remaining = [len(s) for s in shards]
    pending: dict[cf.Future, tuple[int, str, int]] = {}  # future -> (shard index, tensor name, bytes)
    inflight = 0
    reported = 0
    bar = _progress_bar(total, progress)

    def close_shard(si: int) -> None:
        os.close(fds.pop(si))

    def report() -> None:
        nonlocal reported
        while reported < len(shards) and remaining[reported] == 0 and reported not in fds:
            if on_shard is not None:
                on_shard(files[reported], sum(e.nbytes for e in shards[reported]))
            reported += 1

    def reap(block: bool) -> None:
        nonlocal inflight
        if not pending:
            return
        done, _ = cf.wait(list(pending), timeout=None if block else 0, return_when=cf.FIRST_COMPLETED)
        for f in done:
            si, name, n = pending.pop(f)
            exc = f.exception()
            if exc is not None:
                if isinstance(exc, Exception) and not isinstance(exc, ExportError):
                    exc.add_note(f"while writing tensor {name!r} to {files[si]}")
                raise exc
            inflight -= n
            remaining[si] -= 1
            if remaining[si] == 0:
                close_shard(si)
            if bar is not None:
                bar.update(n)

    planned = {e.name: (si, e) for si, shard in enumerate(shards) for e in shard}
    offsets: dict[str, int] = {}

    def dispatch(si: int, e: Entry) -> None:
        nonlocal inflight
        n = e.nbytes
        while pending and not (len(pending) < min_inflight_tensors or inflight + n <= max_inflight_bytes):
            reap(block=True)
        reap(block=False)  # a failed write surfaces before more work is dispatched
        a = _check_produced(e, e.produce())
        a = _start_host_copy(a)  # jax.Array: start the device->host copy now
        f = pool.submit(_write_tensor, fds[si], offsets[e.name], a, stop)
        del a
        pending[f] = (si, e.name, n)
        inflight += n

    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_THREAD_PREFIX)
    try:
        for si, shard in enumerate(shards):
            blob, offs, size = shard_layout(shard, SAFETENSORS_METADATA)
            offsets.update(offs)
            fd = os.open(d / files[si], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            fds[si] = fd
            try:
                _pwrite_all(fd, memoryview(blob), 0, stop)
                os.ftruncate(fd, size)
            except OSError as exc:
                exc.add_note(f"while writing the header of {files[si]}")
                raise
            if late is not None:
                remaining[si] += 1  # held open for the late entries: released below
            if not shard and late is None:
                close_shard(si)
            for e in shard:
                if late is not None and e.late:
                    remaining[si] -= 1
                    continue
                dispatch(si, e)
            report()
        if late is not None:
            todo = list(late())
            missing = sorted(n for n, (_, e) in planned.items() if e.late and n not in {x.name for x in todo})
            if missing:
                raise ExportError(f"internal error: the late tensors {missing[:3]} were never produced")
            for e in todo:
                si, want = planned.get(e.name, (None, None))
                if want is None or tuple(e.shape) != tuple(want.shape) or np.dtype(e.dtype) != np.dtype(want.dtype):
                    raise ExportError(f"internal error: late tensor {e.name!r} does not match the planned layout")
                remaining[si] += 1
                dispatch(si, e)
            for si in range(len(shards)):
                remaining[si] -= 1
                if remaining[si] == 0:
                    close_shard(si)
        while pending:
            reap(block=True)
        report()
    except BaseException:
        stop.set()
        for f in pending:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for si in list(fds):
            close_shard(si)
        if bar is not None:
            bar.close()
    if len(files) > 1:
        meta: dict[str, int] = {}
        if total_parameters is not None:
            meta["total_parameters"] = int(total_parameters)
        meta["total_size"] = total
        index = {"metadata": meta, "weight_map": weight_map}
        (d / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files
