"""Our safetensors reader/writer against the reference safetensors library (torch backend)."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load, save_file as torch_save

from jaxquant.errors import CheckpointError
from jaxquant.io.safetensors import CheckpointFiles, SafetensorsFile, save_file


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "c.f8": rng.uniform(-400, 400, (2, 16)).astype(ml_dtypes.float8_e4m3fn),
        "d.u8": rng.integers(0, 256, (7,), dtype=np.uint8),
        "e.scalar": np.array(0.125, np.float32),
    }


def test_written_files_read_by_reference_library(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "x.safetensors", metadata={"format": "pt"})
    ref = torch_load(str(tmp_path / "x.safetensors"))
    assert set(ref) == set(t)
    assert ref["c.f8"].dtype == torch.float8_e4m3fn
    for k, v in t.items():
        flat = ref[k].reshape(-1)
        got = flat.view(torch.uint8).numpy() if flat.dtype != torch.uint8 else flat.numpy()
        assert got.tobytes() == np.ascontiguousarray(v).tobytes(), k
        assert tuple(ref[k].shape) == v.shape


def test_reads_reference_written_f8_and_bf16(tmp_path):
    x = torch.randn(6, 32)
    ref = {"w": x.to(torch.float8_e4m3fn), "s": torch.tensor(0.5), "b": x.to(torch.bfloat16)}
    torch_save(ref, str(tmp_path / "r.safetensors"))
    f = SafetensorsFile(tmp_path / "r.safetensors")
    assert f.get("w").dtype == ml_dtypes.float8_e4m3fn
    assert f.get("w").view(np.uint8).tobytes() == ref["w"].view(torch.uint8).numpy().tobytes()
    assert f.get("b").view(np.uint16).tobytes() == ref["b"].view(torch.int16).numpy().tobytes()
    assert f.get("s").shape == () and float(f.get("s")) == 0.5


def test_truncated_file_names_tensor(tmp_path):
    save_file(_tensors(), tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "y.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "y.safetensors")


def test_sharded_index_missing_shard(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    idx = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        CheckpointFiles.open(tmp_path)
    save_file({"b": np.zeros(3, np.float32)}, tmp_path / "model-00002-of-00002.safetensors")
    ck = CheckpointFiles.open(tmp_path)
    assert sorted(ck.keys()) == ["a", "b"] and ck.get("b").shape == (3,)


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "z.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"xx")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        SafetensorsFile(tmp_path / "z.safetensors")
