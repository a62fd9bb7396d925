"""Run in a subprocess by ``test_mesh_sharded.py`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the
flag must be set before jax initializes, so it cannot run inside the pytest process).

``python _mesh_worker.py OUT.json ROOT FAMILY[,FAMILY...] CONFIG[;CONFIG...]``: for every family, writes its tiny
checkpoint under ROOT, runs ``jaxquant ptq`` once on one device and once per CONFIG, and compares every export with
the single-device one. A CONFIG is a ``--mesh`` value, optionally followed by ``+layerwise``. Writes
``{family: {config: {"identical": [...], "differ": [...], "ulps": {tensor or amax: n}, "rc": exit status}}}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

KV_FP8 = "general/ptq/nvfp4_default-kv_fp8"
MIXED = "general/ptq/fp8_qkvo-nvfp4_mlp"


def _argv(model: Path, export: Path, recipe: str, config: str | None) -> list[str]:
    argv = ["ptq", "--model", str(model), "--recipe", recipe, "--calib-size", "20", "--calib-seq", "24",
            "--batch-size", "4", "--eval-windows", "0", "--export-path", str(export), "--quiet", "--dtype", "float32"]
    if config is not None:
        mesh, _, extra = config.partition("+")
        argv += ["--mesh", mesh] + (["--layerwise"] if extra == "layerwise" else [])
    return argv


def _tensors(d: Path) -> dict[str, np.ndarray]:
    from jaxquant.io.safetensors import CheckpointFiles

    files = CheckpointFiles.open(d)
    return {k: np.asarray(files.get(k)) for k in files.keys()}


def _ulps(a: float, b: float) -> int:
    return abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32)))


def compare(ref: Path, got: Path) -> dict:
    """Tensors (bytes), hf_quant_config.json and the exact amax sidecar of two exports."""
    a, b = _tensors(ref), _tensors(got)
    identical, differ, ulps = [], [], {}
    for k in sorted(set(a) | set(b)):
        if k in a and k in b and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and \
                a[k].tobytes() == b[k].tobytes():
            identical.append(k)
            continue
        differ.append(k)
        if k in a and k in b and a[k].shape == () and a[k].dtype == np.float32:
            ulps[k] = _ulps(float(a[k]), float(b[k]))
    for name in ("hf_quant_config.json", "config.json"):
        ((identical if (ref / name).read_bytes() == (got / name).read_bytes() else differ)).append(name)
    sa = json.loads((ref / "jaxquant_quant_state.json").read_text())["amax"]
    sb = json.loads((got / "jaxquant_quant_state.json").read_text())["amax"]
    for k in sorted(set(sa) | set(sb)):
        if k in sa and k in sb and sa[k] == sb[k]:
            identical.append(f"amax:{k}")
        else:
            differ.append(f"amax:{k}")
            if k in sa and k in sb:
                ulps[f"amax:{k}"] = _ulps(sa[k], sb[k])
    return {"identical": identical, "differ": differ, "ulps": ulps}


def api_check() -> dict:
    """The Python API on a model built in memory (not loaded with a mesh): ``quantize(..., mesh=...)`` places it and
    gives the single-device calibration state; ``quantize(layerwise=True)`` on the placed model too."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxquant.calibration import quantize
    from jaxquant.mesh import mesh_of
    from jaxquant.models import ModelConfig, build_model

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": False}
    ids = np.random.default_rng(0).integers(1, 96, (12, 16)).astype(np.int32)
    out = {}
    for name, mesh, layerwise in (("none", None, False), ("fsdp=8", "fsdp=8", False),
                                  ("data=2,fsdp=4+layerwise", "data=2,fsdp=4", True)):
        model = build_model(ModelConfig.from_hf_config(hf), dtype=jnp.float32, rngs=nnx.Rngs(0))
        r = quantize(model, "general/ptq/nvfp4_default-kv_fp8", {"input_ids": ids}, batch_size=2, progress=False,
                     mesh=mesh, layerwise=layerwise)
        out[name] = {"state": {k: np.asarray(v).tobytes().hex() for k, v in r.calibration_state.items()},
                     "placed": mesh_of(model) is not None}
    ref = out.pop("none")["state"]
    return {k: {"placed": v["placed"], "differ": sorted(n for n in ref if v["state"].get(n) != ref[n])}
            for k, v in out.items()}


def main(out: str, root: str, families: str, configs: str) -> None:
    from _tiny_families import FAMILIES, write_tiny_family

    from jaxquant.cli import main as cli

    import jax

    assert len(jax.devices()) == 8, jax.devices()
    result: dict = {"api": api_check()}
    for n, fam in enumerate(families.split(",")):
        recipe = KV_FP8 if FAMILIES.index(fam) % 2 == 0 else MIXED
        model = write_tiny_family(fam, Path(root) / fam)
        runs: dict = {}
        for config in [None] + configs.split(";"):
            export = Path(root) / "out" / f"{fam}-{config}".replace("=", "").replace(",", "_").replace("+", "_")
            with contextlib.redirect_stdout(io.StringIO()) as log:
                rc = cli(_argv(model, export, recipe, config))
            if config is None:
                assert rc == 0, log.getvalue()
                continue
            runs[config] = {"rc": rc, **(compare(Path(root) / "out" / f"{fam}-None", export) if rc == 0 else
                                         {"log": log.getvalue()[-2000:]})}
        result[fam] = runs
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
