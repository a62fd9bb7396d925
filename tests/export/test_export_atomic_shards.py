"""Atomic export directories and sharded safetensors writing."""

import errno
import json

import ml_dtypes
import numpy as np
import pytest

from jaxquant.errors import ExportError
from jaxquant.export import atomic, shards
from jaxquant.io.safetensors import CheckpointFiles, SafetensorsFile


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
