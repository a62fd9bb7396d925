"""A streamed ``--layerwise`` run leaves no decoder layer's checkpoint pages in the process after its stage.

On the CPU backend ``jax.device_put`` of a 64-byte aligned numpy view of the memory-mapped safetensors file makes no
copy: the parameter aliases the mapped pages. The loader releases them after the transfer, but the weight amax, the
forward passes and the export read them back in; ``streaming._release`` drops them again once the layer is done.
Without it, every aligned layer stayed resident as file pages (bench_host_rss.py: a 64-layer bf16 checkpoint whose
third shard was aligned peaked at 3.65 GB instead of about 1.8). The checkpoint here is aligned on purpose (its
header padded with spaces, as the format allows), so the aliasing happens; the resident bytes of its mapping are
read from ``/proc/self/smaps`` when each layer starts.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _tiny_cli import cli_files  # noqa: E402

from jaxquant.calibration.stages import StagedStep  # noqa: E402
from jaxquant.cli import main  # noqa: E402
from jaxquant.converters.names import hf_param_names  # noqa: E402
from jaxquant.io.safetensors import save_file  # noqa: E402
from jaxquant.models import ModelConfig, build_model  # noqa: E402

LAYERS = 6


def _aligned_checkpoint(d: Path) -> int:
    """Overwrite ``d``'s config and weights with a 6-layer Llama of about 2.4 MB per layer (float32), every
    tensor 64-byte aligned in the file; returns the bytes of one decoder layer."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 256,
          "intermediate_size": 512, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          "rms_norm_eps": 1e-5, "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(hf))
    model = build_model(ModelConfig.from_hf_config(hf), dtype=jnp.float32, rngs=nnx.Rngs(0))
    names = hf_param_names(model)
    tensors = {names[".".join(str(p) for p in path)]: np.asarray(v.get_value())
               for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    path = d / "model.safetensors"
    save_file(tensors, path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].rstrip(b" ")
    header += b" " * (-(len(header) + 8) % 64)  # data starts 64-byte aligned; every tensor size is a multiple of 64
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    layer = [a for k, a in tensors.items() if k.startswith("model.layers.0.")]
    assert all(a.nbytes % 64 == 0 for a in tensors.values())
    return sum(a.nbytes for a in layer)


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path``."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) >= 6 and head[-1] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(jax.default_backend() != "cpu" or not Path("/proc/self/smaps").exists(),
                    reason="the aliasing is the CPU backend's; needs Linux /proc")
def test_streamed_layers_leave_no_mapped_pages(tmp_path, monkeypatch):
    files = cli_files(tmp_path / "cli")
    ckpt = Path(files["model"])
    layer_bytes = _aligned_checkpoint(ckpt)
    seen: dict[int, int] = {}
    run_layer = StagedStep.run_layer

    def spy(self, i, *a, **kw):
        seen.setdefault(i, _mapped_rss(ckpt / "model.safetensors"))
        return run_layer(self, i, *a, **kw)

    monkeypatch.setattr(StagedStep, "run_layer", spy)
    argv = ["ptq", "--model", str(ckpt), "--dataset", files["calib"], "--calib-size", "4", "--calib-seq", "16",
            "--batch-size", "4", "--eval-windows", "0", "--quiet", "--dtype", "float32", "--layerwise",
            "--recipe", "general/ptq/fp8_qkvo-nvfp4_mlp", "--export-path", str(tmp_path / "out")]
    assert main(argv) == 0
    assert sorted(seen) == list(range(LAYERS))
    # layer i running: its pages were read back by the weight amax (and layer i + 1's may be in flight); without the
    # release after each stage, layers 0 .. i - 1 would still be resident here
    assert max(seen.values()) < 2.5 * layer_bytes, {i: round(b / layer_bytes, 2) for i, b in seen.items()}
    assert seen[LAYERS - 1] > 0.5 * layer_bytes  # the aliasing happened: the test can fail without the release
