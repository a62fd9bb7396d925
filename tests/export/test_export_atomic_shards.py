"""Atomic export directories and sharded safetensors writing."""

import errno
import json
import os
import struct
import sys
import threading
import time
import weakref
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jaxquant.errors import ExportError
from jaxquant.export import atomic, shards
from jaxquant.io.safetensors import TAGS, CheckpointFiles, SafetensorsFile, save_file


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_success_renames_into_place(tmp_path):
    with atomic.atomic_directory(tmp_path / "out") as d:
        assert d.parent == tmp_path and d.name.startswith(".out.jaxquant-tmp-")
        assert (d / atomic.INCOMPLETE_MARKER).exists()
        (d / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert not (tmp_path / "out" / atomic.INCOMPLETE_MARKER).exists()
    assert _leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device"), RuntimeError("bug")])
def test_failure_leaves_nothing(tmp_path, exc):
    with pytest.raises(type(exc)):
        with atomic.atomic_directory(tmp_path / "out") as d:
            (d / "config.json").write_text("{}")
            raise exc
    assert _leftovers(tmp_path) == []


def test_refuses_non_empty_target(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        with atomic.atomic_directory(tmp_path / "out"):
            pass
    with pytest.raises(ExportError, match="not a directory"):
        atomic.check_target(tmp_path / "out" / "keep")
    assert (tmp_path / "out" / "keep").read_text() == "old"
    # an empty existing directory is fine
    (tmp_path / "empty").mkdir()
    with atomic.atomic_directory(tmp_path / "empty") as d:
        (d / "f").write_text("1")
    assert (tmp_path / "empty" / "f").exists()


def test_overwrite_replaces_and_failure_keeps_old(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(tmp_path / "out", overwrite=True) as d:
            (d / "new").write_text("new")
            raise KeyboardInterrupt
    assert _leftovers(tmp_path / "out") == ["old"]
    with atomic.atomic_directory(tmp_path / "out", overwrite=True) as d:
        (d / "new").write_text("new")
    assert _leftovers(tmp_path / "out") == ["new"]
    assert _leftovers(tmp_path) == ["out"]


def test_nested_target_parent_created(tmp_path):
    with atomic.atomic_directory(tmp_path / "a" / "b") as d:
        (d / "f").write_text("1")
    assert (tmp_path / "a" / "b" / "f").exists()


@pytest.mark.parametrize("s,n", [("10GB", 10**10), ("5MB", 5 * 10**6), ("1.5KB", 1500), (" 2 gb", 2 * 10**9), (123, 123)])
def test_parse_size(s, n):
    assert shards.parse_size(s) == n


def test_parse_size_errors():
    for bad in ("10", "10GiB", "xGB", 0):
        with pytest.raises(ExportError):
            shards.parse_size(bad)


def _entries(sizes):
    out = []
    for i, n in enumerate(sizes):
        arr = np.full((n,), i, np.uint8)
        out.append(shards.Entry(f"t{i}", (n,), np.dtype(np.uint8), lambda arr=arr: arr))
    return out


def test_plan_matches_huggingface_hub():
    hub = pytest.importorskip("huggingface_hub.serialization._base")
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = [int(x) for x in rng.integers(1, 100, rng.integers(1, 20))]
        limit = int(rng.integers(10, 150))
        ents = _entries(sizes)
        ours = [[e.name for e in s] for s in shards.plan_shards(ents, limit)]
        ref = hub.split_state_dict_into_shards_factory(
            {e.name: e.nbytes for e in ents}, get_storage_size=lambda n: n,
            filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
        assert ours == list(ref.filename_to_tensors.values())
        assert shards.shard_filenames(len(ours)) == list(ref.filename_to_tensors)


def test_write_sharded_roundtrip(tmp_path):
    ents = _entries([40, 40, 40, 100, 5])
    ents.append(shards.Entry("f8", (2, 4), np.dtype(ml_dtypes.float8_e4m3fn),
                             lambda: np.arange(8, dtype=np.float32).reshape(2, 4).astype(ml_dtypes.float8_e4m3fn)))
    ents.append(shards.Entry("s", (), np.dtype(np.float32), lambda: np.array(0.5, np.float32)))
    files = shards.write_sharded(ents, tmp_path, max_shard_size=90, total_parameters=123)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]  # the 100-byte tensor gets its own
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 123, "total_size": 225 + 8 + 4}
    ck = CheckpointFiles.open(tmp_path)
    assert sorted(ck.keys()) == sorted(e.name for e in ents)
    for e in ents:
        assert ck.get(e.name).tobytes() == e.produce().tobytes()
    assert SafetensorsFile(tmp_path / files[0]).metadata == {"format": "pt"}


def test_write_single_file_and_reference_reader(tmp_path):
    torch_st = pytest.importorskip("safetensors.torch")
    ents = _entries([3, 4])
    assert shards.write_sharded(ents, tmp_path) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    ref = torch_st.load_file(str(tmp_path / "model.safetensors"))
    assert ref["t1"].tolist() == [1, 1, 1, 1]


def test_write_sharded_checks_producer(tmp_path):
    bad = [shards.Entry("x", (3,), np.dtype(np.float32), lambda: np.zeros(4, np.float32))]
    with pytest.raises(ExportError, match="planned as"):
        shards.write_sharded(bad, tmp_path)
    dup = _entries([1]) + _entries([1])
    with pytest.raises(ExportError, match="duplicate"):
        shards.write_sharded(dup, tmp_path)


# ---------------------------------------------------------------------------------------------
# The streamed writer (thread pool, precomputed offsets, bounded in-flight bytes) against the
# previous single-threaded implementation, kept here verbatim as the oracle.

def _reference_write_sharded(entries, directory, *, max_shard_size="10GB", total_parameters=None):
    """The single-threaded write_sharded before streaming (one shard in memory, save_file per shard)."""
    d = Path(directory)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ExportError(f"duplicate tensor names in the export: {dup[:5]}")
    for e in entries:
        if np.dtype(e.dtype) not in TAGS:
            raise ExportError(f"tensor {e.name!r}: dtype {e.dtype} cannot be stored in safetensors")
    plan = shards.plan_shards(entries, max_shard_size) or [[]]
    files = shards.shard_filenames(len(plan))
    weight_map = {}
    for fname, shard in zip(files, plan, strict=True):
        arrays = {}
        for e in shard:
            a = e.produce()
            if tuple(a.shape) != tuple(e.shape) or a.dtype != np.dtype(e.dtype):
                raise ExportError(f"internal error: tensor {e.name!r} was planned as {e.shape} {np.dtype(e.dtype)} "
                                  f"but produced {tuple(a.shape)} {a.dtype}")
            arrays[e.name] = a
            weight_map[e.name] = fname
        save_file(arrays, d / fname, metadata=shards.SAFETENSORS_METADATA)
        del arrays
    if len(files) > 1:
        meta = {}
        if total_parameters is not None:
            meta["total_parameters"] = int(total_parameters)
        meta["total_size"] = sum(e.nbytes for e in entries)
        index = {"metadata": meta, "weight_map": weight_map}
        (d / shards.INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files


def _writer_threads():
    return [t for t in threading.enumerate() if t.name.startswith(shards._THREAD_PREFIX)]


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def _mixed_entries(seed, use_jax):
    """Every stored dtype, 0-d and zero-size tensors, a non-contiguous numpy producer, names out of order."""
    rng = np.random.default_rng(seed)
    dtypes = [np.uint8, np.int8, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_,
              ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e8m0fnu]
    out = []
    for i in range(int(rng.integers(8, 30))):
        dt = np.dtype(dtypes[int(rng.integers(len(dtypes)))])
        shape = tuple(int(x) for x in rng.integers(0 if i % 11 == 0 else 1, 40, int(rng.integers(0, 3))))
        vals = (rng.standard_normal(shape) * 4).astype(np.float32)
        arr = (vals > 0) if dt == np.bool_ else np.abs(vals).astype(dt) if dt == np.uint8 else vals.astype(dt)
        name = f"model.layers.{int(rng.integers(0, 30))}.w{i}"
        if use_jax and i % 2 == 0 and dt.itemsize < 8:  # jax without x64 has no 64-bit arrays
            import jax
            import jax.numpy as jnp

            f = jax.jit(lambda x: (x * 1.0).astype(x.dtype))
            prod = (lambda a=arr, f=f: f(jnp.asarray(a)))
        elif arr.ndim == 2 and i % 3 == 0:
            t = np.ascontiguousarray(arr.T)
            prod = (lambda t=t: t.T)  # a Fortran-ordered view
        else:
            prod = (lambda a=arr: a)
        out.append(shards.Entry(name, shape, dt, prod))
    return out


def _dir_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("opts", [{}, {"workers": 1, "max_inflight_bytes": 0, "min_inflight_tensors": 1},
                                  {"workers": 3, "max_inflight_bytes": 500, "min_inflight_tensors": 2}])
def test_streamed_bytes_identical_to_reference(tmp_path, seed, opts):
    use_jax = seed % 2 == 1
    ents = _mixed_entries(seed, use_jax)
    for limit in (10**9, 700, 150):
        ref, new = tmp_path / f"ref{limit}", tmp_path / f"new{limit}"
        ref.mkdir(), new.mkdir()
        assert shards.write_sharded(ents, new, max_shard_size=limit, total_parameters=7, **opts) == \
            _reference_write_sharded(ents, ref, max_shard_size=limit, total_parameters=7)
        assert _dir_bytes(new) == _dir_bytes(ref)
    assert _writer_threads() == []


def test_streamed_empty_and_header_layout(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert shards.write_sharded([], tmp_path / "a") == _reference_write_sharded([], tmp_path / "b") == ["model.safetensors"]
    assert _dir_bytes(tmp_path / "a") == _dir_bytes(tmp_path / "b")
    ents = _entries([3, 5])
    blob, offsets, size = shards.shard_layout(ents, shards.SAFETENSORS_METADATA)
    (n,) = struct.unpack("<Q", blob[:8])
    assert len(blob) == 8 + n and len(blob) % 8 == 0
    assert offsets == {"t0": len(blob), "t1": len(blob) + 3} and size == len(blob) + 8


def test_produce_error_midway_propagates_and_stops_writers(tmp_path):
    produced = []

    def make(i):
        def produce():
            produced.append(i)
            if i == 7:
                raise RuntimeError("producer bug at 7")
            return np.full((1000,), i, np.uint8)
        return produce

    ents = [shards.Entry(f"t{i:02d}", (1000,), np.dtype(np.uint8), make(i)) for i in range(20)]
    fds = _open_fds()
    with pytest.raises(RuntimeError, match="producer bug at 7"):
        shards.write_sharded(ents, tmp_path, max_shard_size=3000, min_inflight_tensors=2, max_inflight_bytes=0)
    assert produced == list(range(8))
    assert _writer_threads() == []
    assert _open_fds() == fds


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_write_error_propagates_promptly(tmp_path, monkeypatch, exc):
    real = shards._pwrite_all
    calls = []

    def failing(fd, buf, offset, stop):
        calls.append(offset)
        if len(calls) == 4:  # the header of file 1 is call 1, then tensors
            raise exc("disk on fire")
        return real(fd, buf, offset, stop)

    monkeypatch.setattr(shards, "_pwrite_all", failing)
    produced = []
    ents = [shards.Entry(f"t{i:03d}", (100,), np.dtype(np.uint8),
                         (lambda i=i: produced.append(i) or np.full((100,), i, np.uint8))) for i in range(200)]
    fds = _open_fds()
    with pytest.raises(exc, match="disk on fire") as info:
        shards.write_sharded(ents, tmp_path, max_shard_size=1000, workers=2)
    assert len(produced) < 20  # stopped dispatching well before the end
    if exc is OSError:  # the 4th write is a tensor, or (when the workers lag) the next file's header
        assert any(n.startswith("while writing") for n in info.value.__notes__)
    assert _writer_threads() == []
    assert _open_fds() == fds


def test_produce_interrupt_stops_pool(tmp_path):
    def produce():
        raise KeyboardInterrupt

    ents = _entries([10, 10]) + [shards.Entry("zz", (3,), np.dtype(np.uint8), produce)]
    with pytest.raises(KeyboardInterrupt):
        shards.write_sharded(ents, tmp_path)
    assert _writer_threads() == []


@pytest.mark.parametrize("use_jax", [False, True])
def test_streamed_mismatch_is_export_error(tmp_path, use_jax):
    if use_jax:
        import jax.numpy as jnp

        wrong_shape = lambda: jnp.zeros((4,), jnp.float32)
        wrong_dtype = lambda: jnp.zeros((3,), jnp.bfloat16)
    else:
        wrong_shape = lambda: np.zeros((4,), np.float32)
        wrong_dtype = lambda: np.zeros((3,), ml_dtypes.bfloat16)
    for prod, what in ((wrong_shape, r"\(4,\) float32"), (wrong_dtype, r"\(3,\) bfloat16")):
        ents = _entries([10, 20]) + [shards.Entry("layer.bad", (3,), np.dtype(np.float32), prod)]
        with pytest.raises(ExportError, match=rf"'layer.bad' was planned as \(3,\) float32 but produced {what}"):
            shards.write_sharded(ents, tmp_path)
        assert _writer_threads() == []


@pytest.mark.parametrize("bound,min_tensors,sizes", [
    (10_000, 1, [3000] * 30),
    (10_000, 4, [3000] * 30),
    (0, 3, [1000, 9000, 500, 12000, 3000] * 6),
    (20_000, 2, [1000, 9000, 500, 12000, 3000, 25000] * 5),
])
def test_inflight_bound(tmp_path, monkeypatch, bound, min_tensors, sizes):
    """Counts the produced arrays still alive (weakref finalizers) each time a new one is produced,
    with slow writes so that the producer runs ahead as far as the bound lets it."""
    real = shards._pwrite_all

    def slow(fd, buf, offset, stop):
        time.sleep(0.002)
        return real(fd, buf, offset, stop)

    monkeypatch.setattr(shards, "_pwrite_all", slow)
    lock = threading.Lock()
    alive = {"bytes": 0, "count": 0}
    peak = {"bytes": 0, "count": 0}

    def released(n):
        with lock:
            alive["bytes"] -= n
            alive["count"] -= 1

    def make(i, n):
        def produce():
            a = np.full((n,), i % 251, np.uint8)
            with lock:
                alive["bytes"] += n
                alive["count"] += 1
                peak["bytes"] = max(peak["bytes"], alive["bytes"])
                peak["count"] = max(peak["count"], alive["count"])
            weakref.finalize(a, released, n)
            return a
        return produce

    ents = [shards.Entry(f"t{i:03d}", (n,), np.dtype(np.uint8), make(i, n)) for i, n in enumerate(sizes)]
    shards.write_sharded(ents, tmp_path, max_shard_size=40_000, workers=4,
                         max_inflight_bytes=bound, min_inflight_tensors=min_tensors)
    allowed = max(bound + max(sizes), sum(sorted(sizes)[-min_tensors:]))
    # precisely: a tensor is admitted only while count < min_tensors or bytes + its size <= bound
    assert peak["bytes"] <= max(bound, sum(sorted(sizes)[-min_tensors:])) <= allowed
    assert peak["count"] >= min(min_tensors, 2)  # writes did overlap production
    assert alive == {"bytes": 0, "count": 0}
    ck = CheckpointFiles.open(tmp_path)
    assert all(ck.get(e.name).tobytes() == bytes([i % 251]) * e.shape[0] for i, e in enumerate(ents))


def test_progress_bar_only_on_a_tty(tmp_path, monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for tty, progress, shown in ((True, True, True), (False, True, False), (True, False, False)):
        err = Tty() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        d = tmp_path / f"{tty}{progress}"
        d.mkdir()
        shards.write_sharded(_entries([1000, 2000]), d, progress=progress)
        assert ("writing" in err.getvalue()) == shown, err.getvalue()


def test_on_shard_in_order(tmp_path):
    seen = []
    files = shards.write_sharded(_entries([40, 40, 40, 100, 5, 0]), tmp_path, max_shard_size=90,
                                 on_shard=lambda f, n: seen.append((f, n)))
    assert seen == list(zip(files, [80, 100, 45], strict=True))  # the 100-byte tensor gets its own shard
