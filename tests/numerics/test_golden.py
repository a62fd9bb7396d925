"""Bit-identity of the quantization functions across backends, against committed golden bytes.

``golden/cpu.npz`` and ``golden/gpu.npz`` hold the inputs and the output bytes that
``golden/make_golden.py`` computed on a CPU and on an NVIDIA GPU. Here every output is recomputed on
the CPU backend from the stored inputs and compared byte for byte (NaN-aware for the NaN/Inf input
group). Without ``gpu.npz`` the GPU comparison is skipped, and says so. On a machine with a GPU the
live GPU-vs-CPU comparison runs too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
GPU_COMMAND = ("python tests/numerics/golden/make_golden.py --out tests/numerics/golden/gpu.npz "
               "(on a machine whose JAX default backend is a CUDA GPU)")


def _load_maker():
    spec = importlib.util.spec_from_file_location("jaxquant_make_golden", GOLDEN / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mg = _load_maker()


def _outputs_on(device, inputs) -> dict[str, np.ndarray]:
    with jax.default_device(device):
        return {k: mg._as_bytes(jax.device_get(v))[0] for k, v in mg.compute(inputs).items()}


@pytest.fixture(scope="module")
def cpu_device():
    return jax.devices("cpu")[0]


def _nan_positions(raw: np.ndarray, dtype: str) -> np.ndarray:
    import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 names with numpy)

    return np.isnan(raw.view(np.dtype(dtype)).astype(np.float32))


def _compare(meta: dict, expected: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str):
    assert set(got) == set(expected), f"{what}: different outputs (regenerate the golden file?)"
    bad = []
    for key, want in expected.items():
        have = got[key]
        dtype = meta["layout"][f"out/{key}"][0]
        if key.split("|")[1].startswith("nonfinite"):
            nw, nh = _nan_positions(want, dtype), _nan_positions(have, dtype)
            size = np.dtype(dtype).itemsize
            keep = ~np.repeat(nw, size)
            if not (np.array_equal(nw, nh) and np.array_equal(want[keep], have[keep])):
                bad.append(key)
        elif not np.array_equal(want, have):
            bad.append(key)
    assert not bad, f"{what}: {len(bad)} of {len(expected)} outputs differ, e.g. {bad[:5]}"


def _check_file(path: Path, cpu_device):
    meta, inputs, expected = mg.read_npz(path)
    assert meta["format_version"] == mg.FORMAT_VERSION
    fresh = mg.build_inputs(meta["seed"])
    for k, v in inputs.items():  # the file's inputs are the generator's (the files are comparable)
        np.testing.assert_array_equal(v, fresh[k], err_msg=k)
    _compare(meta, expected, _outputs_on(cpu_device, inputs), f"CPU recompute vs {path.name} ({meta['backend']})")
    return meta


def test_cpu_matches_committed_cpu_golden(cpu_device):
    meta = _check_file(GOLDEN / "cpu.npz", cpu_device)
    assert meta["backend"] == "cpu"


def test_cpu_matches_committed_gpu_golden(cpu_device):
    path = GOLDEN / "gpu.npz"
    if not path.is_file():
        pytest.skip(f"GPU golden bytes not committed yet: no {path.relative_to(GOLDEN.parents[2])}; make them with "
                    f"{GPU_COMMAND}")
    meta, _, _ = mg.read_npz(path)
    assert meta["backend"] == "gpu", f"{path.name} was made on {meta['backend']}, not a GPU"
    assert "nvptx-prec-divf32" not in meta.get("xla_flags", ""), (
        f"{path.name} was made with XLA's IEEE-division flag; without it the GPU divides approximately and "
        f"jaxquant rounds exactly in integers, the path this file must cover: remake it without: {GPU_COMMAND}")
    _check_file(path, cpu_device)


def test_golden_files_are_small_and_identical_across_backends():
    files = [p for p in (GOLDEN / "cpu.npz", GOLDEN / "gpu.npz") if p.is_file()]
    assert all(p.stat().st_size < 2 * 1024 * 1024 for p in files)
    if len(files) < 2:
        pytest.skip(f"only {files[0].name} is committed; {GPU_COMMAND}")
    (m1, _, o1), (m2, _, o2) = (mg.read_npz(p) for p in files)
    _compare(m1, o1, o2, "gpu.npz vs cpu.npz")


def test_live_gpu_matches_cpu(cpu_device):
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("no GPU backend on this machine (the committed gpu.npz stands in for it)")
    inputs = mg.build_inputs()
    meta = {"layout": {f"out/{k}": [np.asarray(v).dtype.name, list(np.shape(v))]
                       for k, v in mg.compute(inputs).items()}}
    _compare(meta, _outputs_on(cpu_device, inputs), _outputs_on(gpu, inputs), "GPU vs CPU, live")


def test_meta_is_json():
    meta, _, _ = mg.read_npz(GOLDEN / "cpu.npz")
    json.dumps(meta)
    assert {"backend", "device_kind", "jax", "seed", "layout", "xla_flags"} <= set(meta)


def test_lowers_to_plain_stablehlo_on_every_platform():
    """Every quantization function (and the QAT gradient) lowers for CPU, CUDA and TPU (cross-platform
    export: no such device is needed) to ordinary StableHLO: no custom call (no cuBLAS/cuDNN/Triton/Pallas
    kernel), and no narrow float type but float8_e4m3fn (E4M3 rounding is integer arithmetic; E4M3 values
    appear only as the export's output dtype)."""
    import re

    import jax.numpy as jnp
    from jax import export

    from jaxquant.numerics import fp8, nvfp4
    from jaxquant.qat import fake_quant

    x = jax.ShapeDtypeStruct((4, 40), jnp.bfloat16)
    fns = {
        "fp8.fake_quant": lambda x: fp8.fake_quant(x, 3.0),
        "fp8.quantize": lambda x: fp8.quantize(x, 3.0),
        "nvfp4.fake_quant_dynamic": lambda x: nvfp4.fake_quant_dynamic(x, 3.0),
        "nvfp4.fake_quant_static": lambda x: nvfp4.fake_quant_static(x, jnp.ones((4, 3)), 1.0),
        "nvfp4.quantize": lambda x: nvfp4.quantize(x),
        "qat.fake_quant grads": jax.grad(
            lambda x, a: fake_quant("nvfp4", 16, x, a, None, False).astype(jnp.float32).sum(), argnums=(0, 1)),
    }
    narrow = re.compile(r"[x<](f[468]E\d\w*)")
    for platform in ("cpu", "cuda", "tpu"):
        for name, f in fns.items():
            args = (x, jax.ShapeDtypeStruct((), jnp.float32)) if name.startswith("qat") else (x,)
            text = export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()
            assert "custom_call" not in text, f"{name} on {platform}"
            found = set(narrow.findall(text))
            assert found <= {"f8E4M3FN"}, f"{name} on {platform}: {found}"
