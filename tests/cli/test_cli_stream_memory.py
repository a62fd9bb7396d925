"""Host memory of a streamed ``--layerwise`` run: RSS growth is bounded by a few layers, not the checkpoint.

The checkpoint is a real safetensors one written by transformers from a config (random weights): 16 decoder layers
of about 4.2 MB each in float32 (67 MB) and a 0.13 MB embedding and head, so the layers are nearly all of it. Each
run is measured in a fresh subprocess: one warm-up run (compilation, allocator pools, imports), then the peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) of a second run minus the RSS before it.

Bound: the growth must stay below ``FRACTION`` (0.35) of the checkpoint. A streamed run holds the shell, one layer
being calibrated and its export tensors in flight (about 2 of 16 layers, 12 %), plus allocator slack; the
non-streamed ``--layerwise --no-stream`` run holds every parameter (100 %, checked too, so the test can fail).
Measured on the CPU: checkpoint 63.2 MB; growth 12.7 MB streamed (20 %), 70.4 MB not streamed (111 %).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRACTION = 0.35

_WORKER = r"""
import json, sys
from pathlib import Path
from jaxquant.cli import main
argv, out = json.loads(sys.argv[1]), Path(sys.argv[2])
def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
assert main(argv + ["--export-path", str(out / "warm")]) == 0
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
assert main(argv + ["--export-path", str(out / "run")]) == 0
print("RSS", json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def _write_checkpoint(d: Path, tokenizer_dir: Path) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=16,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(d, safe_serialization=True)
    for p in tokenizer_dir.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(p, d / p.name)
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _growth(tmp: Path, argv: list[str]) -> int:
    out = tmp / f"out{len(list(tmp.glob('out*')))}"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(argv), str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rss = json.loads(r.stdout.rsplit("RSS ", 1)[1])
    return rss["peak"] - rss["before"]


@pytest.mark.slow  # about 3 minutes on 2 shared cores: two subprocesses, each runs twice
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streamed_host_memory_is_bounded_by_a_few_layers(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_cli import cli_files

    files = cli_files(tmp_path / "cli")
    ckpt = tmp_path / "ckpt"
    size = _write_checkpoint(ckpt, Path(files["model"]))
    assert size > 60e6
    argv = ["ptq", "--model", str(ckpt), "--dataset", files["calib"], "--calib-size", "8", "--calib-seq", "32",
            "--batch-size", "4", "--eval-windows", "0", "--quiet", "--dtype", "float32", "--overwrite",
            "--recipe", "general/ptq/fp8_qkvo-nvfp4_mlp", "--layerwise"]
    streamed = _growth(tmp_path, argv)
    whole = _growth(tmp_path, argv + ["--no-stream"])
    print(f"checkpoint {size / 1e6:.1f} MB; RSS growth streamed {streamed / 1e6:.1f} MB, "
          f"not streamed {whole / 1e6:.1f} MB")
    assert whole > 0.9 * size  # the bound can fail: the whole model in host memory exceeds it
    assert streamed < FRACTION * size
